"""The job file of a student training: what the imitation stage asks the training process to do.

The imitation stage (lion_local.stages.imitation.train_student) writes it as <iteration>/sft_job.json;
the training process (lion_local.stages.sft, possibly one per GPU or node) reads it back. Both sides
use this one type, so a field renamed or added on one side cannot be missed on the other, and a
damaged file is refused in one line naming it instead of failing deep inside the training.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from lion_local.errors import LionError
from lion_local.run.state import write_atomic


class SftJobError(LionError):
    """A job file that cannot be read as an SftJob; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class SftJob:
    """One student training. Paths are strings, as the job file holds them (JSON)."""

    base_model: str  # the checkpoint trained from (a directory)
    data_file: str  # the prompt/completion examples (JSONL)
    output_dir: str  # where the finished model goes (renamed into place by the parent)
    work_dir: str  # trainer checkpoints, to resume a killed training from
    progress_file: str  # step and loss, for the parent's progress bar and `lion-local status`
    result_file: str  # the training's summary, written once it finished
    tensorboard_dir: str | None  # TensorBoard event files; None: none written
    seed: int  # the run's seed plus the iteration number
    adapter_init: str | None  # LoRA: the adapter to continue; None: a new one (or no LoRA)
    imitation: dict[str, Any]  # the config's imitation section, as dumped to JSON (its `trainer` included)

    def as_dict(self) -> dict[str, Any]:
        """The job as the JSON object of its file."""
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        """Write the job file whole: a reader sees the old file or the new one, never a mix."""
        write_atomic(path, json.dumps(self.as_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> SftJob:
        """The job in `path`; SftJobError, naming the file, when it is unreadable, not JSON, or a
        field is missing, unknown or of the wrong type."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise SftJobError(f"{path}: cannot read the training job: {exc.strerror}") from None
        except ValueError as exc:  # not JSON, or not UTF-8
            raise SftJobError(f"{path}: the training job is not valid JSON: {exc}") from None
        problem = job_problem(data)
        if problem is not None:
            raise SftJobError(f"{path}: not a training job: {problem}")
        return cls(**data)


def job_problem(data: Any) -> str | None:
    """What keeps a parsed job file from being an SftJob, or None (pure)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    hints = typing.get_type_hints(SftJob)
    names = [field.name for field in dataclasses.fields(SftJob)]
    missing = [name for name in names if name not in data]
    if missing:
        return f"missing {', '.join(missing)}"
    unknown = sorted(set(data) - set(names))
    if unknown:
        return f"unknown field(s) {', '.join(unknown)}"
    for name in names:
        if not _has_type(data[name], hints[name]):
            return f"{name!r} is {json.dumps(data[name])[:80]}, not {_shown(hints[name])}"
    return None


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value has one of the types of `hint` (str, int, dict, their `| None`)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, each) for each in typing.get_args(hint))
    kind = typing.get_origin(hint) or hint
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _shown(hint: Any) -> str:
    names = {str: "a string", int: "an integer", dict: "an object", type(None): "null"}
    alternatives = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return " or ".join(names.get(typing.get_origin(each) or each, str(each)) for each in alternatives)
