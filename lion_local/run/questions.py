"""Evaluation question sets: JSONL files of {question, category?, id?}, read strictly.

The built-in set is lion_local/data/eval_questions.jsonl. A question without an id is identified
by its text (the instruction id of lion_local.run.records), so editing it makes a new question.
Two readers share this module: `lion-local evaluate` (the questions it asks) and the generation
stage's decontamination (lion_local.stages.decontamination: the questions no generated
instruction may come close to), so it sits in the run model, below both.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lion_local.errors import InputError
from lion_local.input_files import InputKind, parse_json, read_text
from lion_local.run.records import instruction_id


class QuestionsError(InputError):
    """A bad evaluation question file; the message is one line naming the file and the line."""


QUESTION_FILE = InputKind("question file", "give a JSONL file of question objects", 256 << 20, QuestionsError)


def default_questions() -> Path:
    return Path(str(resources.files("lion_local.data").joinpath("eval_questions.jsonl")))


def load_questions(path: str | Path) -> list[dict]:
    """[{"id", "question", "category"}] from a JSONL file; a bad line raises QuestionsError."""
    path = Path(path)
    text = read_text(path, QUESTION_FILE)
    questions: list[dict] = []
    line_of: dict[str, int] = {}
    # Only "\n" ends a line: splitlines() would also split at U+2028 inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        item = parse_json(line, path, QuestionsError, line=number)
        if not isinstance(item, dict):
            raise QuestionsError(f"{where}: expected an object with a 'question' field, got {type(item).__name__}")
        question, category, given_id = item.get("question"), item.get("category"), item.get("id")
        if not isinstance(question, str) or not question.strip():
            problem = "missing" if question is None else "empty" if isinstance(question, str) else "not a string"
            raise QuestionsError(f"{where}: field 'question' is {problem}; each line needs a non-empty question")
        if category is not None and not isinstance(category, str):
            raise QuestionsError(f"{where}: field 'category' must be a string, not {type(category).__name__}")
        if given_id is not None and (type(given_id) not in (str, int) or given_id == ""):
            raise QuestionsError(f"{where}: field 'id' must be a non-empty string or an integer")
        question_id = str(given_id) if given_id is not None else instruction_id(question.strip())
        if question_id in line_of:
            raise QuestionsError(
                f"{where}: id {question_id!r} repeats the one at line {line_of[question_id]} "
                "(a question without an id is identified by its text); ids must be unique"
            )
        line_of[question_id] = number
        questions.append({"id": question_id, "question": question.strip(), "category": category or None})
    if not questions:
        raise QuestionsError(f"{path}: the question file holds no questions")
    return questions
