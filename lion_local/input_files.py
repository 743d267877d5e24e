"""The one reader of the files a user hands lion-local: seed data, question sets, config YAML.

Every such file goes through `read_text`, then `parse_json` or `parse_yaml`, so each refuses the
same things in one line naming the file (and the line, where it is known), before anything is
written:

- a path that is not a regular file (a directory, FIFO, socket or device: checked with stat()
  before the file is opened, so a FIFO never blocks), a symlink loop, a permission error;
- a file larger than its kind's cap, bytes that are not UTF-8 (with the line);
- JSON or YAML syntax errors (with the line), nesting deeper than MAX_DEPTH levels, YAML aliases
  that expand to more than MAX_VALUES values, integers beyond 64 bits (Python refuses to convert
  decimal strings over 4300 digits), JSON's NaN and Infinity and floats beyond the float range,
  and strings or keys holding a lone surrogate (a "\\ud800" escape: no UTF-8 file can store it).

PyYAML is the YAML parser; apart from it this module uses the standard library and
lion_local.errors only, so every layer may read its files through it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lion_local.errors import InputError

MAX_DEPTH = 64  # nested lists and mappings
MAX_VALUES = 1_000_000  # values of a YAML document once its aliases are expanded
MAX_INT_BITS = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
# A \u escape of a surrogate that is not part of a pair: only to find the line of one found in a value.
_LONE_SURROGATE_ESCAPE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


@dataclass(frozen=True)
class InputKind:
    """One kind of input file: how its errors name it, the hint when it is missing, its size cap and
    the error class raised (each an InputError: exit 2)."""

    noun: str  # "seed data file"
    missing_hint: str  # "set seed_data to a JSON or JSONL file"; "" for none
    max_bytes: int
    error: type[InputError] = InputError


class _Refused(Exception):
    """A value this module refuses; `line` (1-based) where known, else `literal` to find it by."""

    def __init__(self, message: str, line: int | None = None, literal: str | None = None) -> None:
        super().__init__(message)
        self.line, self.literal = line, literal


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_text(path: str | os.PathLike, kind: InputKind, context: str = "") -> str:
    """The file's text; `context` follows the noun in errors (" (included from X)")."""
    path = Path(path)
    raw = _read_bytes(path, kind, context)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise kind.error(
            f"{path}:{line}: not valid UTF-8 (byte {exc.start}){context}; re-encode the file as UTF-8"
        ) from None


def _read_bytes(path: Path, kind: InputKind, context: str) -> bytes:
    cannot, raw = f"{path}: cannot read {kind.noun}{context}", b""
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size <= kind.max_bytes:
            # O_NONBLOCK: should the path have become a FIFO since stat(), opening it does not block.
            descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(descriptor, "rb") as handle:
                info = os.fstat(handle.fileno())
                raw = handle.read(kind.max_bytes + 1) if stat.S_ISREG(info.st_mode) else b""
    except FileNotFoundError:
        hint = f"; {kind.missing_hint}" if kind.missing_hint else ""
        raise kind.error(f"{path}: {kind.noun} not found{context}{hint}") from None
    except OSError as exc:
        loop = " (a symlink loop)" if exc.errno == errno.ELOOP else ""
        raise kind.error(f"{cannot}: {exc.strerror or exc}{loop}") from None
    if not stat.S_ISREG(info.st_mode):
        what = next((name for test, name in _FILE_TYPES if test(info.st_mode)), "not a regular file")
        raise kind.error(f"{cannot}: it is {what}, not a regular file; give the path of a regular file")
    if max(info.st_size, len(raw)) > kind.max_bytes:
        raise kind.error(f"{cannot}: larger than the {kind.max_bytes:,} bytes allowed; split or shorten it")
    return raw


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------


def parse_json(text: str, path: str | os.PathLike, error: type[InputError], line: int | None = None) -> Any:
    """One JSON document, checked (module docstring). `line`: the document is that line of a JSON
    Lines file; errors then name it (else the line inside the document, where known)."""
    where = f"{path}:{line}" if line is not None else str(path)
    try:
        data = json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except _Refused as exc:
        found = text.find(exc.literal) if line is None and exc.literal else -1
        at = f"{path}:{text.count(chr(10), 0, found) + 1}" if found >= 0 else where
        raise error(f"{at}: {exc}") from None
    except json.JSONDecodeError as exc:
        at, column = (where, f" (column {exc.colno})") if line is not None else (f"{path}:{exc.lineno}", "")
        raise error(f"{at}: invalid JSON: {exc.msg}{column}") from None
    except RecursionError:
        raise error(f"{where}: {_too_deep()}") from None
    problem = _json_value_problem(data, 1, "\\u" in text)
    if problem is not None:
        found = _LONE_SURROGATE_ESCAPE.search(text) if line is None and "surrogate" in problem else None
        at = f"{path}:{text.count(chr(10), 0, found.start()) + 1}" if found else where
        raise error(f"{at}: {problem}")
    return data


def _json_int(literal: str) -> int:
    return _bounded_int(literal, lambda: int(literal))


def _json_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _Refused(f"the number {_short(literal)} is beyond the range of a float; write a smaller number",
                       literal=literal)
    return value


def _json_constant(name: str) -> float:
    raise _Refused(f"{name} is not a number lion-local accepts; write a finite number", literal=name)


def _json_value_problem(value: Any, depth: int, strings: bool) -> str | None:
    """Why a parsed JSON value is refused (nesting, lone surrogates), or None; the root is at depth 1.
    `strings`: check strings and keys (only a \\u escape can make a lone surrogate)."""
    if depth > MAX_DEPTH:
        return _too_deep()
    if isinstance(value, str):
        return _string_problem(value) if strings else None
    if isinstance(value, dict):
        for key, item in value.items():
            problem = (_string_problem(key) if strings else None) or _json_value_problem(item, depth + 1, strings)
            if problem is not None:
                return problem
    elif isinstance(value, list):
        for item in value:
            problem = _json_value_problem(item, depth + 1, strings)
            if problem is not None:
                return problem
    return None


# ----------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with this module's limits, each raised with the line of its node."""

    depth = 0

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.depth >= MAX_DEPTH:
            raise _Refused(_too_deep(), self.peek_event().start_mark.line + 1)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    literal = str(loader.construct_scalar(node))
    return _bounded_int(literal, lambda: yaml.SafeLoader.construct_yaml_int(loader, node), node.start_mark.line + 1)


def _construct_str(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    value = yaml.SafeLoader.construct_yaml_str(loader, node)
    problem = _string_problem(value)
    if problem is not None:
        raise _Refused(problem, node.start_mark.line + 1)
    return value


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:str", _construct_str)


def parse_yaml(
    text: str, where: str, error: type[InputError], lines: bool = True, text_if_not_yaml: bool = False
) -> Any:
    """One YAML document, checked (module docstring). Errors name `where` (plus ":line" when `lines`);
    `text_if_not_yaml`: a syntax error returns the text itself (a --set value)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded(node, 1, {}, set())
        return loader.construct_document(node)
    except _Refused as exc:
        raise error(f"{where}{f':{exc.line}' if lines and exc.line else ''}: {exc}") from None
    except yaml.YAMLError as exc:
        if text_if_not_yaml:
            return text
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if lines and mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where}{line}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise error(f"{where}: {_too_deep()}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a constructor's own check (a bad date, ...)
        raise error(f"{where}: cannot read a value: {exc}") from None
    finally:
        loader.dispose()


def _expanded(node: yaml.Node, depth: int, seen: dict[int, tuple[int, int]], active: set[int]) -> tuple[int, int]:
    """(values, height) of a composed node with its aliases expanded; refuses a document that
    expands beyond MAX_VALUES or MAX_DEPTH, or an alias inside the collection it names."""
    if depth > MAX_DEPTH:
        raise _Refused(_too_deep() + " (through aliases)", _line(node))
    key = id(node)
    if key in active:
        raise _Refused("an alias refers to the collection that holds it (a recursive structure)", _line(node))
    if key not in seen:
        values, height = 1, 0
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            active.add(key)
            children = node.value if isinstance(node, yaml.SequenceNode) else [part for pair in node.value for part in pair]
            for child in children:
                child_values, child_height = _expanded(child, depth + 1, seen, active)
                values, height = values + child_values, max(height, child_height + 1)
                if values > MAX_VALUES:
                    raise _Refused(f"aliases expand the document to more than {MAX_VALUES:,} values", _line(child))
            active.discard(key)
        seen[key] = (values, height)
    if depth + seen[key][1] > MAX_DEPTH:
        raise _Refused(_too_deep() + " (through aliases)", _line(node))
    return seen[key]


# ----------------------------------------------------------------------------------------------
# The rules on values, shared by both formats
# ----------------------------------------------------------------------------------------------


def _bounded_int(literal: str, convert, line: int | None = None) -> int:
    """The integer of `literal` (converted by `convert`) if it fits in MAX_INT_BITS bits."""
    # 64 bits are at most 20 decimal digits (66 characters in binary): longer is refused unconverted.
    value = convert() if len(literal.replace("_", "")) <= MAX_INT_BITS + 3 else None
    if value is None or value.bit_length() > MAX_INT_BITS:
        raise _Refused(
            f"the integer {_short(literal)} is out of range (at most {MAX_INT_BITS} bits, about 1.8e19); "
            "write a smaller number",
            line,
            literal,
        )
    return value


def _string_problem(value: str) -> str | None:
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return (
        f"a string holds a lone surrogate ({ascii(found.group())[1:-1]}), which is not a character; "
        "write the character itself or a complete surrogate pair"
    )


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _too_deep() -> str:
    return f"nested deeper than {MAX_DEPTH} levels; flatten the data"


def _short(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:12]}...{literal[-4:]} ({len(literal)} characters)"
