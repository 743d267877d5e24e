"""The run directory's layout: every path a run writes, and the typed names of its stages.

Each file and folder of a run directory (docs/run-directory.md) is named here and nowhere else:
the rest of lion-local asks `RunDir` and `IterationDir` for a path and never spells a file name.
A stage is a `Stage`, an `Iteration` (1, 2, ..., or the final imitation) and a stage name; it is
written "2/discrimination" or "final/imitation" in state.json and in the journals, and read back
with `Stage.parse`. Nothing here creates a file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

StageName = Literal["imitation", "discrimination", "generation"]
STAGE_NAMES: tuple[StageName, ...] = ("imitation", "discrimination", "generation")
_FINAL_NAME = "final"


@dataclass(frozen=True)
class Iteration:
    """One pass of the loop, numbered from 1, or the final imitation (`FINAL`, number None)."""

    number: int | None

    def __post_init__(self) -> None:
        if self.number is not None and (not isinstance(self.number, int) or self.number < 1):
            raise ValueError(f"an iteration is numbered from 1, not {self.number!r}")

    @classmethod
    def parse(cls, text: str) -> Iteration:
        """"1", "2", ... or "final"; ValueError for anything else."""
        if text == _FINAL_NAME:
            return FINAL
        if text.isdigit() and int(text) >= 1:
            return cls(int(text))
        raise ValueError(f"{text!r} is not an iteration: give a number from 1, or {_FINAL_NAME}")

    @property
    def is_final(self) -> bool:
        return self.number is None

    @property
    def dirname(self) -> str:
        return _FINAL_NAME if self.number is None else f"iter_{self.number}"

    @property
    def json_value(self) -> int | str:
        """How report.json and result.json write it: the number, or "final"."""
        return _FINAL_NAME if self.number is None else self.number

    @property
    def sort_key(self) -> tuple[int, int]:
        return (1, 0) if self.number is None else (0, self.number)

    def stage(self, name: StageName) -> Stage:
        return Stage(self, name)

    def __str__(self) -> str:
        return _FINAL_NAME if self.number is None else str(self.number)


FINAL = Iteration(None)
# The student before any imitation (the configured model): its evaluation's name and directory.
INITIAL = "initial"


@dataclass(frozen=True)
class Stage:
    """One stage of one iteration; its text form is its marker in state.json ("1/imitation")."""

    iteration: Iteration
    name: StageName

    def __post_init__(self) -> None:
        if self.name not in STAGE_NAMES or (self.iteration.is_final and self.name != "imitation"):
            raise ValueError(f"{self.iteration}/{self.name} is not a stage")

    @classmethod
    def parse(cls, marker: str) -> Stage:
        """The stage of a marker ("2/generation", "final/imitation"); ValueError for anything else."""
        iteration, _, name = marker.partition("/")
        if name not in STAGE_NAMES:
            raise ValueError(f"{marker!r} is not a stage: write <iteration>/<{'|'.join(STAGE_NAMES)}>")
        return cls(Iteration.parse(iteration), name)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.iteration}/{self.name}"


def all_stages(iterations: int, final_imitation: bool) -> list[Stage]:
    """Every stage of a run, in the order they run."""
    stages = [Iteration(k).stage(name) for k in range(1, iterations + 1) for name in STAGE_NAMES]
    return stages + ([FINAL.stage("imitation")] if final_imitation else [])


class IterationDir:
    """iter_<k>/ or final/ and every file a stage writes in it (docs/run-directory.md)."""

    def __init__(self, path: Path, iteration: Iteration) -> None:
        self.path = path
        self.iteration = iteration

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"IterationDir({self.path})"

    def exists(self) -> bool:
        return self.path.exists()

    # The pools (lion_local.run.records)
    train_pool = property(lambda self: self.path / "train_pool.jsonl")
    cache_pool = property(lambda self: self.path / "cache_pool.jsonl")
    # Imitation (lion_local.stages.imitation, and the training process lion_local.stages.sft)
    student = property(lambda self: self.path / "student")
    student_partial = property(lambda self: self.path / "student.partial")
    sft_checkpoints = property(lambda self: self.path / "sft_checkpoints")
    sft_data = property(lambda self: self.path / "sft_data.jsonl")
    sft_job = property(lambda self: self.path / "sft_job.json")
    sft_progress = property(lambda self: self.path / "sft_progress.json")
    sft_result = property(lambda self: self.path / "sft_result.json")
    sft_log = property(lambda self: self.path / "logs" / "sft.log")
    imitation_summary = property(lambda self: self.path / "imitation.json")
    # Discrimination (lion_local.stages.discrimination)
    student_answers = property(lambda self: self.path / "student_answers.jsonl")
    reviews = property(lambda self: self.path / "reviews.jsonl")
    controls = property(lambda self: self.path / "controls.jsonl")  # the referee's control pairs
    # signal likelihood: the student's NLL of each teacher answer (lion_local.stages.likelihood_gaps)
    likelihoods = property(lambda self: self.path / "likelihoods.jsonl")
    judgements = property(lambda self: self.path / "judgements.jsonl")
    discrimination_summary = property(lambda self: self.path / "discrimination.json")
    # Generation (lion_local.stages.generation)
    generator_calls = property(lambda self: self.path / "generator_calls.jsonl")
    generated = property(lambda self: self.path / "generated.jsonl")
    rejected = property(lambda self: self.path / "rejected.jsonl")
    generation_summary = property(lambda self: self.path / "generation.json")
    # Written when the iteration's last stage ends (lion_local.stages.iteration_report)
    report = property(lambda self: self.path / "report.json")


class EvaluationDir:
    """eval/<checkpoint>/: one student checkpoint's evaluation (lion_local.commands.evaluation)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    student_answers = property(lambda self: self.path / "student_answers.jsonl")
    judgements = property(lambda self: self.path / "judgements.jsonl")
    # the checkpoint's NLL of each teacher answer (lion_local.commands.evaluation_likelihood)
    likelihood = property(lambda self: self.path / "likelihood.jsonl")
    result = property(lambda self: self.path / "result.json")


class RunDir:
    """The run directory and its top-level files; `at(iteration)` gives an iteration's directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    config_yaml = property(lambda self: self.root / "config.yaml")
    # What shaped the run's results, and the overrides accepted on resume (lion_local.run.identity)
    identity = property(lambda self: self.root / "identity.json")
    state_json = property(lambda self: self.root / "state.json")
    teacher_answers = property(lambda self: self.root / "teacher_answers.jsonl")
    # One record per server start: {"server", "engine", "model", "base_url", "started_at"}
    servers_journal = property(lambda self: self.root / "servers.jsonl")
    lock = property(lambda self: self.root / ".lock")
    logs = property(lambda self: self.root / "logs")
    main_log = property(lambda self: self.root / "logs" / "lion-local.log")
    report_md = property(lambda self: self.root / "report.md")
    # Every iteration's report.json and evaluation result in one file (lion_local.commands.report)
    report_json = property(lambda self: self.root / "report.json")
    plots = property(lambda self: self.root / "plots")
    eval_teacher_answers = property(lambda self: self.root / "eval" / "teacher_answers.jsonl")
    eval_teacher_likelihood = property(lambda self: self.root / "eval" / "teacher_likelihood.jsonl")

    def at(self, iteration: Iteration) -> IterationDir:
        return IterationDir(self.root / iteration.dirname, iteration)

    def iteration(self, number: int) -> IterationDir:
        return self.at(Iteration(number))

    @property
    def final(self) -> IterationDir:
        return self.at(FINAL)

    def numbered_iterations(self) -> list[Iteration]:
        """The numbered iterations with a directory, in order."""
        names = (re.fullmatch(r"iter_([1-9][0-9]*)", path.name) for path in self.root.glob("iter_*"))
        return [Iteration(number) for number in sorted(int(match[1]) for match in names if match)]

    def evaluation(self, iteration: Iteration | None) -> EvaluationDir:
        """eval/<checkpoint>/ of an iteration's student, or of the initial student (None): eval/initial/."""
        return EvaluationDir(self.root / "eval" / (INITIAL if iteration is None else iteration.dirname))

    def evaluation_results(self) -> list[Path]:
        return sorted((self.root / "eval").glob("*/result.json"))

    def tensorboard(self, iteration: Iteration) -> Path:
        """One TensorBoard directory per imitation stage: `tensorboard --logdir <run_dir>/tensorboard`."""
        return self.root / "tensorboard" / iteration.dirname

    def endpoints(self, server: str) -> Path:
        """Where `lion-local serve NAME --publish` publishes, unless servers.<NAME>.endpoint_dir says otherwise."""
        return self.root / "endpoints" / server

    def serve_log(self, server: str, job_id: str | None) -> Path:
        # Replicas of a job array share the run directory: one log each.
        return self.logs / (f"serve-{server}-{job_id}.log" if job_id else f"serve-{server}.log")

    def superseded(self, name: str) -> Path:
        """superseded/<name>/: what a stage re-opened by an accepted change had written, set aside."""
        return self.root / "superseded" / name


def write_probe(directory: Path, pid: int) -> Path:
    """The file a command writes, syncs and removes to prove `directory` writable before it starts."""
    return directory / f".write-probe-{pid}"


def finished_outputs(run: RunDir, stage: Stage) -> list[tuple[Path, bool]]:
    """[(path, is a folder)]: what a finished stage leaves for the stages after it (and state.json
    may only say it finished while they are there)."""
    directory = run.at(stage.iteration)
    if stage.name == "imitation":
        pools = [directory.train_pool] if stage.iteration.is_final else [directory.train_pool, directory.cache_pool]
        report = [directory.report] if stage.iteration.is_final else []
        return [(path, False) for path in (*pools, directory.imitation_summary, *report)] + [(directory.student, True)]
    if stage.name == "discrimination":
        return [(directory.judgements, False), (directory.discrimination_summary, False)]
    return [(directory.generated, False), (directory.generation_summary, False), (directory.report, False)]


def is_adapter(directory: Path) -> bool:
    """A LoRA adapter: its config and its weights."""
    return (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file()


def is_checkpoint(directory: Path) -> bool:
    """A finished student: full weights, or a LoRA adapter (imitation.peft.serve: adapter)."""
    full = (directory / "config.json").exists() and any(directory.glob("*.safetensors"))
    return directory.is_dir() and (full or is_adapter(directory))


def builds_on(upcoming: Stage, finished: Stage, iterations: int) -> bool:
    """Whether `upcoming`, or a stage after it in its iteration, reads what `finished` left: a
    stage of its own iteration or of the one before (of the last, for the final imitation).
    Older iterations are history the loop no longer reads (their checkpoints may be pruned)."""
    number = iterations + 1 if upcoming.iteration.is_final else upcoming.iteration.number
    return finished.iteration.number is not None and number - 1 <= finished.iteration.number <= number


# The JSONL files whose every record carries a string "id" (its instruction's, or its question's).
ID_KEYED_FILES = frozenset(
    path.name
    for path in (
        *(getattr(IterationDir(Path(), FINAL), name) for name in (
            "train_pool", "cache_pool", "generated", "sft_data", "student_answers", "reviews", "controls", "judgements",
        )),
        RunDir("").teacher_answers,
        RunDir("").eval_teacher_likelihood,
        EvaluationDir(Path()).likelihood,
    )
)
