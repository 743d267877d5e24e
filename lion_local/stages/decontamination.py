"""Decontamination: no generated instruction may come close to an evaluation question.

A generated instruction that paraphrases, or copies a stretch of, a question the checkpoints are
later evaluated on trains the student on the test and inflates every relative score the project
reports. The generation stage therefore rejects, with reason `contaminated`, an instruction that
is too close to any question of the run's decontamination set (the built-in questions of
lion_local/data/eval_questions.jsonl unless generation.decontamination.include_builtin_questions
is off, plus every file of generation.decontamination.question_files). "Too close" is either of:

- **ROUGE-L**: its ROUGE-L F-measure against some question is above
  generation.decontamination.rouge_threshold, with the comparison of the novelty check
  (kept only if <= the threshold). `NoveltyIndex` computes it, so the values are exactly those
  of `rouge-score` (its default tokenizer, no stemming) and the decision is exact: an
  instruction passes if and only if its F against every question is at most the threshold.
  This catches paraphrases that keep most of a question's words in order, at any length.
- **n-gram overlap**: it shares a run of n = generation.decontamination.ngram consecutive words
  with some question. Words are the maximal runs of letters, digits and underscores (Python's
  `\\w`, so any script) of the lowercased text; punctuation and spacing are ignored. Every
  n-gram of every question is kept in a set (as word tuples: no hashing, no false match), so
  an instruction passes if and only if none of its n-grams is a question's. This catches a
  question copied inside a much longer instruction, whose ROUGE-L F the extra words dilute.
  An instruction (or a question) with fewer than n words has no n-gram: only ROUGE-L checks it.

What it does not guarantee: a paraphrase that shares few words with the question, in order
(synonyms, reordering, translation), passes both checks; ROUGE-L's tokenizer keeps only ASCII
letters and digits, so for text in other scripts only the n-gram check applies.

The check is a pure function of the question list and the instruction (the first question in
file order wins a tie), so the stage's decisions stay a function of its journal.
"""

from __future__ import annotations

import re
from pathlib import Path

from lion_local.config import Config
from lion_local.run.questions import QuestionsError, default_questions, load_questions
from lion_local.run.record_types import Contamination, Question
from lion_local.stages.novelty import NoveltyIndex

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The n-gram check's words: runs of letters, digits and underscores of the lowercased text."""
    return _WORD.findall(text.lower())


class DecontaminationIndex:
    """The evaluation questions, queried for the one a new instruction is too close to."""

    def __init__(self, questions: list[Question], rouge_threshold: float = 0.7, ngram: int = 13) -> None:
        if ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {ngram}")
        self.ngram = ngram
        self._rouge = NoveltyIndex(rouge_threshold)
        self._ids: list[str] = []  # by position in the ROUGE-L index
        self._grams: dict[tuple[str, ...], str] = {}  # n-gram -> id of the first question holding it
        for question in questions:
            self._rouge.add(question["question"])
            self._ids.append(question["id"])
            for gram in _ngrams(words(question["question"]), ngram):
                self._grams.setdefault(gram, question["id"])

    def __len__(self) -> int:
        return len(self._ids)

    def check(self, instruction: str) -> Contamination | None:
        """None when the instruction is clean, else what makes it contaminated:
        {"question": id, "question_similarity": F} with the question of highest ROUGE-L F (above
        the threshold), or {"question": id, "shared_ngram": "the n shared words"} for the first
        of its n-grams that a question holds. ROUGE-L is checked first."""
        novel, _, _ = self._rouge.check(instruction)
        if not novel:
            similarity, index = self._rouge.most_similar(instruction)
            return {"question": self._ids[index], "question_similarity": round(similarity, 6)}
        for gram in _ngrams(words(instruction), self.ngram):
            question = self._grams.get(gram)
            if question is not None:
                return {"question": question, "shared_ngram": " ".join(gram)}
        return None


def _ngrams(tokens: list[str], n: int):
    return (tuple(tokens[start : start + n]) for start in range(len(tokens) - n + 1))


# ----------------------------------------------------------------------------------------------
# The run's decontamination set, from its config
# ----------------------------------------------------------------------------------------------


def question_files(config: Config) -> list[Path]:
    """The resolved question files of the run's decontamination, in order; [] when it is off."""
    settings = config.generation.decontamination
    if not settings.enabled:
        return []
    files = [default_questions()] if settings.include_builtin_questions else []
    files += [Path(path) for path in settings.question_files]
    return list(dict.fromkeys(path.expanduser().resolve() for path in files))


def decontamination_index(config: Config) -> DecontaminationIndex | None:
    """The index over the run's decontamination questions; None when the check is off. A bad
    question file raises QuestionsError, one line naming the key and the file."""
    settings = config.generation.decontamination
    if not settings.enabled:
        return None
    questions: list[Question] = []
    for path in question_files(config):
        try:
            questions += load_questions(path)
        except QuestionsError as exc:
            raise QuestionsError(f"generation.decontamination.question_files: {exc}") from None
    return DecontaminationIndex(questions, settings.rouge_threshold, settings.ngram)
