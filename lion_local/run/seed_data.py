"""Reading seed instructions: a JSON list or JSON Lines of {"instruction", "input"?, ...} objects.

Every problem is reported as one line naming the file and the line (JSONL) or item (JSON list),
so a 52K-line file with one bad record is fixed in a minute rather than debugged for an hour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lion_local.errors import InputError
from lion_local.input_files import InputKind, parse_json, read_text

MAX_TEXT_CHARS = 20_000


class SeedDataError(InputError):
    """A bad seed file; the message is one line naming the file and line."""


SEED_FILE = InputKind("seed data file", "set seed_data to a JSON or JSONL file", 1 << 30, SeedDataError)


@dataclass(frozen=True)
class SeedInstruction:
    instruction: str
    input: str = ""
    output: str = ""


def load_seed_instructions(path: str | Path, limit: int | None = None) -> list[SeedInstruction]:
    path = Path(path)
    text = read_text(path, SEED_FILE)
    if not text.strip():
        raise SeedDataError(f"{path}: the seed data file is empty")

    if text.lstrip().startswith("["):
        items = _json_list_items(path, text)
    else:
        items = _jsonl_items(path, text)

    records: list[SeedInstruction] = []
    seen: dict[tuple[str, str], str] = {}
    for where, item in items:
        record = _to_record(where, item)
        key = (record.instruction, record.input)
        if key in seen:
            raise SeedDataError(f"{where}: duplicate of the instruction at {seen[key]}; remove one of them")
        seen[key] = where
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise SeedDataError(
            f"{path}: the seed data file holds no instructions; add at least one object with an 'instruction' field"
        )
    return records


def _json_list_items(path: Path, text: str) -> list[tuple[str, object]]:
    data = parse_json(text, path, SeedDataError)
    if not isinstance(data, list):
        raise SeedDataError(f"{path}: top level must be a list of objects (or use JSON Lines)")
    return [(f"{path}: item {index}", item) for index, item in enumerate(data)]


def _jsonl_items(path: Path, text: str) -> list[tuple[str, object]]:
    items = []
    # Only "\n" ends a line: splitlines() would also split at U+2028, U+0085, ... inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}:{number}", parse_json(line, path, SeedDataError, line=number)))
        except SeedDataError:
            if not items:
                _reject_single_json_document(path, text)
            raise
    return items


def _reject_single_json_document(path: Path, text: str) -> None:
    """A file that is one JSON document but not a list (a pretty-printed object): say that, not "invalid JSON"."""
    try:
        data = parse_json(text, path, SeedDataError)
    except SeedDataError:
        return
    kind = "an object" if isinstance(data, dict) else f"a {type(data).__name__}"
    raise SeedDataError(f"{path}: top level is {kind}; it must be a list of objects (or use JSON Lines)")


def _to_record(where: str, item: object) -> SeedInstruction:
    if not isinstance(item, dict):
        raise SeedDataError(f"{where}: expected an object with an 'instruction' field, got {type(item).__name__}")
    instruction = item.get("instruction")
    if not isinstance(instruction, str):
        problem = "missing" if instruction is None else f"a {type(instruction).__name__}, not a string"
        raise SeedDataError(f"{where}: field 'instruction' is {problem}")
    if not instruction.strip():
        raise SeedDataError(f"{where}: field 'instruction' is empty")
    input_text = item.get("input") or ""
    if not isinstance(input_text, str):
        raise SeedDataError(f"{where}: field 'input' must be a string, not {type(input_text).__name__}")
    if len(instruction) + len(input_text) > MAX_TEXT_CHARS:
        raise SeedDataError(
            f"{where}: instruction and input are {len(instruction) + len(input_text)} characters long, "
            f"more than the {MAX_TEXT_CHARS} allowed; shorten or drop it"
        )
    output = item.get("output") if isinstance(item.get("output"), str) else ""
    return SeedInstruction(instruction.strip(), input_text.strip(), output.strip())
