"""imitation.trainer: TRL's SFTConfig settings, passed through; the paper's defaults and their rules.

The config names trainer settings by SFTConfig's own field names, so a new trainer option needs
no change here. SFTConfig's fields and types come from the class itself (dataclasses.fields,
typing.get_type_hints). Importing trl imports torch, transformers and peft (about 4 s) and loading
a config must stay fast, so a child process reads them once per installed trl and transformers and
the result is kept in the user's cache directory (~/.cache/lion-local/); later loads read that file.

Each key given is checked at config load, in the parent process, so a bad value fails in one line
before anything runs: against SFTConfig's own annotation (int, float, bool, str, None, Literal,
mapping, list; a transformers enum such as lr_scheduler_type by its values), every float finite,
and the numeric fields that matter against TRAINER_RANGES.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

SEED_MAX = 2**32 - 1  # seeds are 32-bit: numpy's and torch's generators, vLLM's requests


# The paper's student training, as trl.SFTConfig keyword arguments: imitation.trainer starts from these.
PAPER_TRAINER: dict[str, Any] = {
    "learning_rate": 2.0e-5,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float below 1 is a share of all optimizer steps
    "weight_decay": 0.0,
    "max_length": 1024,  # longest training example, in tokens
    "bf16": True,  # honoured on a GPU only
    "activation_checkpointing": False,
    "save_steps": 200,  # a trainer checkpoint this often, so a killed training resumes
    "logging_steps": 10,
}

# SFTConfig fields lion-local sets itself (lion_local.stages.sft), and where each one comes from.
LION_LOCAL_TRAINER_KEYS = {
    "output_dir": "the stage's sft_checkpoints/ in the run directory",
    "seed": "the run's seed (plus the iteration number)",
    "data_seed": "the run's seed (plus the iteration number)",
    "use_cpu": "the GPU when torch sees one, else the CPU",
    "report_to": "TensorBoard event files under <run_dir>/tensorboard",
    "completion_only_loss": "the loss is on the teacher's answer only",
    "packing": "one example per sequence",
    "disable_tqdm": "progress goes to the stage's progress bar and `lion-local status`",
    "save_strategy": "a checkpoint every imitation.trainer.save_steps steps",
    "save_total_limit": "only the newest checkpoint is kept, to resume from",
    "resume_from_checkpoint": "training resumes from its last complete checkpoint by itself",
    "gradient_accumulation_steps": "it comes from imitation.effective_batch_size",
    "model_init_kwargs": "the attention implementation (flash-attn on GPUs that have it, else SDPA)",
    "dataloader_num_workers": "data loads in the training process",
}
# Deprecated SFTConfig aliases, refused for their new names (PAPER_TRAINER's activation_checkpointing
# would silently win over a configured gradient_checkpointing).
ALIASED_TRAINER_KEYS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
# The flat imitation keys of earlier lion-local versions and the SFTConfig field each one became.
MOVED_IMITATION_KEYS = {
    "learning_rate": "learning_rate",
    "num_train_epochs": "num_train_epochs",
    "max_seq_length": "max_length",
    "per_device_batch_size": "per_device_train_batch_size",
    "lr_scheduler_type": "lr_scheduler_type",
    "warmup_ratio": "warmup_steps",
    "weight_decay": "weight_decay",
    "bf16": "bf16",
    "gradient_checkpointing": "activation_checkpointing",
    "save_steps": "save_steps",
    "logging_steps": "logging_steps",
}

# SFTConfig's numeric fields that matter and their ranges: (low, high, low open, high open); None: no bound.
TRAINER_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "learning_rate": (0, None, True, False),
    "num_train_epochs": (0, None, True, False),  # 0 only with max_steps > 0
    "max_steps": (-1, None, False, False),  # -1: num_train_epochs decides
    "per_device_train_batch_size": (1, None, False, False),
    "per_device_eval_batch_size": (1, None, False, False),
    "gradient_accumulation_steps": (1, None, False, False),
    "eval_accumulation_steps": (1, None, False, False),
    "max_length": (1, None, False, False),
    "warmup_steps": (0, None, False, False),  # below 1: a share of all steps
    "warmup_ratio": (0, 1, False, False),
    "weight_decay": (0, None, False, False),
    "adam_beta1": (0, 1, False, True),
    "adam_beta2": (0, 1, False, True),
    "adam_epsilon": (0, None, True, False),
    "max_grad_norm": (0, None, False, False),
    "label_smoothing_factor": (0, 1, False, True),
    "neftune_noise_alpha": (0, None, True, False),
    "logging_steps": (0, None, True, False),
    "save_steps": (0, None, True, False),
    "eval_steps": (0, None, True, False),
    "save_total_limit": (1, None, False, False),
    "seed": (0, SEED_MAX, False, False),
    "data_seed": (0, SEED_MAX, False, False),
    "dataloader_num_workers": (0, None, False, False),
    "dataloader_prefetch_factor": (1, None, False, False),
    "dataset_num_proc": (1, None, False, False),
    "torch_empty_cache_steps": (1, None, False, False),
    "pad_to_multiple_of": (1, None, False, False),
    "ddp_timeout": (1, None, False, False),
}


class SftField(NamedTuple):
    """One SFTConfig field, as the type checks need it (JSON-able, so it can be cached on disk)."""

    annotation: str  # shown, e.g. "int | None"
    kinds: tuple[str, ...]  # each alternative: a _PLAIN_TYPES name, "enum", or "other" (a class: anything goes)
    values: frozenset[str]  # the string values of its enums (lr_scheduler_type's SchedulerType, ...)
    literals: tuple[Any, ...] = ()  # the options of a Literal[...]


def _alternatives(hint: Any) -> list[Any]:
    """The alternatives of a type hint: `A | B | None`, Optional[A], Union[A, B]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [each for part in typing.get_args(hint) for each in _alternatives(part)]
    return [hint]


def _kind(hint: Any) -> str:
    """The _PLAIN_TYPES name of one alternative, "enum" for an Enum with string values, else "other"."""
    origin = typing.get_origin(hint) or hint
    plain = {type(None): "None", bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "list"}
    if hint is typing.Any:
        return "Any"
    if origin is typing.Literal:
        return "Literal"
    if isinstance(origin, type) and issubclass(origin, enum.Enum):
        return "enum" if any(isinstance(member.value, str) for member in origin) else "other"
    return plain.get(origin, "other") if isinstance(origin, type) else "other"


def _shown(hint: Any) -> str:
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else repr(hint).replace("typing.", "")


def describe_sft_config() -> dict[str, dict[str, Any]]:
    """trl.SFTConfig's fields -> what SftField holds, from the class itself (dataclasses.fields,
    typing.get_type_hints). It imports trl, so it runs in a child process (`_describe_in_child`)."""
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    described = {}
    for field in dataclasses.fields(SFTConfig):
        alternatives = _alternatives(hints[field.name])
        kinds = [_kind(each) for each in alternatives]
        enums = [each for each, kind in zip(alternatives, kinds) if kind == "enum"]
        described[field.name] = {
            "annotation": " | ".join(_shown(each) for each in alternatives),
            "kinds": kinds,
            "values": sorted({m.value for each in enums for m in each if isinstance(m.value, str)}),
            "literals": [
                option for each, kind in zip(alternatives, kinds) if kind == "Literal" for option in typing.get_args(each)
            ],
        }
    return described


_CACHE_FORMAT = "v1"  # bump when describe_sft_config's output changes


def _cache_file() -> Path | None:
    """Where the description of the installed trl and transformers is kept: the user's cache directory."""
    try:
        versions = f"trl{metadata.version('trl')}-transformers{metadata.version('transformers')}"
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (metadata.PackageNotFoundError, RuntimeError):  # no package metadata, or no home directory
        return None
    return root / "lion-local" / f"sft-config-fields-{_CACHE_FORMAT}-{versions}.json"


def _fields(described: dict[str, Any]) -> dict[str, SftField]:
    return {
        name: SftField(
            str(each["annotation"]), tuple(each["kinds"]), frozenset(each["values"]), tuple(each["literals"])
        )
        for name, each in described.items()
    }


def _read_cache(cache: Path | None) -> dict[str, SftField] | None:
    """The fields kept in `cache`, or None when it is absent or damaged (then made again)."""
    if cache is None:
        return None
    try:
        return _fields(json.loads(cache.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _describe_in_child() -> dict[str, Any]:
    """describe_sft_config() run by a child process, so that this one never imports trl (seconds)."""
    package_root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import json, sys; sys.path.insert(0, {package_root!r}); "
        "from lion_local.trainer_settings import describe_sft_config; "
        "sys.stdout.write('\\n' + json.dumps(describe_sft_config()) + '\\n')"  # on a line of its own
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["no error output"])[-1]
        raise RuntimeError(f"exit code {child.returncode}: {last}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def _keep(cache: Path | None, described: dict[str, Any]) -> None:
    """Write the description to `cache` whole (a unique temporary name, then renamed); a cache that
    cannot be written costs only the child process next time."""
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(described, out)
            os.replace(temporary, cache)
        finally:
            Path(temporary).unlink(missing_ok=True)
    except OSError as exc:
        logger.info("cannot keep trl's SFTConfig fields in %s: %s", cache, exc)


@functools.lru_cache(maxsize=1)
def sft_config_fields() -> dict[str, SftField] | None:
    """trl.SFTConfig's fields, from the class itself: read by a child process once per installed trl
    and transformers, then from the cache, so loading a config never imports trl; None without trl."""
    if importlib.util.find_spec("trl") is None:
        return None
    cache = _cache_file()
    fields = _read_cache(cache)
    if fields is None:
        try:
            described = _describe_in_child()
            fields = _fields(described)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError,
                subprocess.SubprocessError) as exc:
            logger.warning("cannot read trl's SFTConfig fields (%s); imitation.trainer's keys are not checked", exc)
            return None
        _keep(cache, described)
    return fields


# ----------------------------------------------------------------------------------------------
# The checks of imitation.trainer at config load
# ----------------------------------------------------------------------------------------------


def trainer_problem(trainer: dict[str, Any]) -> tuple[str, str] | None:
    """(key, why) for the first key of imitation.trainer that cannot be, else None; the other keys
    keep the paper's values (PAPER_TRAINER), with which a given key is checked."""
    fields = sft_config_fields() if trainer else None  # nothing to check: no lookup
    settings = {**PAPER_TRAINER, **trainer}
    for key, value in trainer.items():
        problem = trainer_key_problem(key, value, fields, settings)
        if problem is not None:
            return key, problem
    return None


def trainer_key_problem(
    key: str, value: Any, fields: dict[str, SftField] | None, settings: dict[str, Any]
) -> str | None:
    """Why `key` (with `value`) cannot be an imitation.trainer setting, or None when it can."""
    if key in LION_LOCAL_TRAINER_KEYS:
        return f"lion-local sets this key itself: {LION_LOCAL_TRAINER_KEYS[key]}"
    if key in ALIASED_TRAINER_KEYS:
        return f"a deprecated alias in trl; set imitation.trainer.{ALIASED_TRAINER_KEYS[key]} instead"
    if fields is None:
        return _number_problem(key, value, settings)  # trl is not installed: the training process says the rest
    if key not in fields:
        renamed = MOVED_IMITATION_KEYS.get(key)
        close = [renamed] if renamed in fields else difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if close == ["warmup_steps"]:
            hint = " (did you mean 'warmup_steps'? a float below 1 is a share of all steps)"
        return f"not a field of trl's SFTConfig{hint}"
    return _type_problem(value, fields[key]) or _number_problem(key, value, settings)


def _type_problem(value: Any, field: SftField) -> str | None:
    """Why `value` does not have the field's type (SFTConfig's annotation), or None; a type this does
    not know (a config class) accepts anything."""
    if "other" in field.kinds:
        return None
    if isinstance(value, str) and field.values:
        return None if value in field.values else _not_a_value(value, field.values)
    if any(_accepts(kind, value, field.literals) for kind in field.kinds):
        return None
    wanted = " or ".join(dict.fromkeys(_PLAIN_TYPES.get(kind, "a string") for kind in field.kinds))
    if isinstance(value, str) and set(field.kinds) - {"None"} <= {"int", "float"}:
        hint = " (YAML reads 2e-5 as text; write 2.0e-5)" if _is_float_text(value) else ""
        return f"expects a number, got the string {value!r}{hint}"
    shown = "null" if value is None else f"{type(value).__name__} {value!r}"
    return f"expects {wanted}, got {shown}"


def _not_a_value(value: str, allowed: frozenset[str]) -> str:
    close = sorted(each for each in allowed if each.startswith(value))[:1]
    close = close or difflib.get_close_matches(value, list(allowed), n=1)
    if len(allowed) <= 12 or not close:
        return f"must be one of {', '.join(sorted(allowed))}; got {value!r}"
    return f"{value!r} is not one of its {len(allowed)} values (did you mean {close[0]!r}?)"


_PLAIN_TYPES = {
    "None": "null", "bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
    "dict": "a mapping", "list": "a list", "Literal": "a listed value", "Any": "any value",
}


def _accepts(kind: str, value: Any, literals: tuple[Any, ...]) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {
        "None": value is None, "bool": isinstance(value, bool), "int": number and isinstance(value, int),
        "float": number, "str": isinstance(value, str), "dict": isinstance(value, dict),
        "list": isinstance(value, list), "Any": True,
        "Literal": any(type(option) is type(value) and option == value for option in literals),
    }
    return checks.get(kind, False)


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number_problem(key: str, value: Any, settings: dict[str, Any]) -> str | None:
    """Why a number is out of the field's range (TRAINER_RANGES; every float finite), or None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    low, high, low_open, high_open = TRAINER_RANGES.get(key, (None, None, False, False))
    if key == "num_train_epochs" and value == 0 and _positive(settings.get("max_steps")):
        return None  # max_steps sets the length of training
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not (below or above):
        return None
    if high is None:
        wanted = f"{'>' if low_open else '>='} {low}"
    else:
        wanted = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    also = " (or set max_steps > 0)" if key == "num_train_epochs" else ""
    return f"must be {wanted}{also}, got {value}"


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
