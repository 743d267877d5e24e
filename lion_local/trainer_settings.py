"""imitation.trainer: TRL's SFTConfig settings, passed through; the paper's defaults and their rules.

The config names trainer settings by SFTConfig's own field names, so a new trainer option needs
no change here. Loading a config must stay fast, and importing trl imports torch (seconds), so
SFTConfig's fields are read from the installed sources with `ast` instead, following its base
classes (transformers' TrainingArguments) through their imports.

Each key given is checked at config load, in the parent process, so a bad value fails in one line
before anything runs: against SFTConfig's own annotation (int, float, bool, str, None, Literal,
mapping, list; a transformers enum such as lr_scheduler_type by its values), every float finite,
and the numeric fields that matter against TRAINER_RANGES.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import math
from pathlib import Path
from typing import Any, NamedTuple

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


def _module_source(module: str) -> Path | None:
    """The source file of `module`, found without importing it (nor its package)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin else None
    for location in spec.submodule_search_locations or ():
        base = Path(location, *rest)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


@functools.lru_cache(maxsize=None)
def _parsed(module: str) -> tuple[Path, ast.Module]:
    path = _module_source(module)
    if path is None:
        raise LookupError(module)
    return path, ast.parse(path.read_text(encoding="utf-8"))


def _imported_from(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name of `from ... import` in `module` (a package when path is __init__.py)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join([*package, *([node.module] if node.module else [])])


def _find_class(module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef]:
    """(the module defining it, the class) of class `name` as seen from `module`, imports followed."""
    if depth > 12:
        raise LookupError(name)
    path, tree = _parsed(module)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
    for node in ast.walk(tree):  # re-exported: follow the import (lazy packages import under TYPE_CHECKING)
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _find_class(_imported_from(module, path, node), alias.name, depth + 1)
    raise LookupError(name)


class SftField(NamedTuple):
    annotation: str  # source text, e.g. "int | None"
    module: str  # the module whose names the annotation uses


def _dataclass_fields(module: str, name: str, depth: int = 0) -> dict[str, SftField]:
    """Field name -> SftField of class `name` as seen from `module`, bases included."""
    if depth > 12:
        raise LookupError(name)
    defining, node = _find_class(module, name)
    fields: dict[str, SftField] = {}
    for base in reversed(node.bases):
        if isinstance(base, ast.Name) and base.id != "object":
            fields.update(_dataclass_fields(defining, base.id, depth + 1))
    for statement in node.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            annotation = ast.unparse(statement.annotation)
            if not annotation.startswith(("ClassVar", "typing.ClassVar", "InitVar")):
                fields[statement.target.id] = SftField(annotation, defining)
    return fields


@functools.lru_cache(maxsize=1)
def sft_config_fields() -> dict[str, SftField] | None:
    """trl.SFTConfig's fields and their annotations, read from the installed sources (importing trl
    would import torch, seconds on every command); None when trl is not installed or unreadable."""
    try:
        return _dataclass_fields("trl", "SFTConfig")
    except (LookupError, OSError, SyntaxError, ValueError, ImportError):
        return None


@functools.lru_cache(maxsize=None)
def _enum_values(module: str, name: str) -> frozenset[str] | None:
    """The string values of the Enum class `name` as seen from `module` (SchedulerType, ...), or None."""
    try:
        _, node = _find_class(module, name)
    except (LookupError, OSError, SyntaxError, ValueError, ImportError):
        return None
    if not any("Enum" in _name(base) for base in node.bases):
        return None
    values = {
        statement.value.value
        for statement in node.body
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    }
    return frozenset(values) or None


# ----------------------------------------------------------------------------------------------
# The checks of imitation.trainer at config load
# ----------------------------------------------------------------------------------------------


def trainer_problem(trainer: dict[str, Any]) -> tuple[str, str] | None:
    """(key, why) for the first key of imitation.trainer that cannot be, else None; the other keys
    keep the paper's values (PAPER_TRAINER), with which a given key is checked."""
    fields = sft_config_fields()
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
    kinds = _alternatives(ast.parse(field.annotation, mode="eval").body)
    names = [_name(kind) for kind in kinds]
    enums = {name: _enum_values(field.module, name) for name in names if name not in _PLAIN_TYPES}
    if any(values is None for values in enums.values()):
        return None
    allowed = frozenset().union(*enums.values()) if enums else frozenset()
    if isinstance(value, str) and allowed:
        return None if value in allowed else _not_a_value(value, allowed)
    if any(_accepts(name, kind, value) for name, kind in zip(names, kinds) if name in _PLAIN_TYPES):
        return None
    wanted = " or ".join(dict.fromkeys(_PLAIN_TYPES.get(name, "a string") for name in names))
    if isinstance(value, str) and set(names) - {"None"} <= {"int", "float"}:
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
    "dict": "a mapping", "Dict": "a mapping", "list": "a list", "List": "a list", "Literal": "a listed value",
    "Any": "any value",
}


def _accepts(name: str, kind: ast.expr, value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {
        "None": value is None, "bool": isinstance(value, bool), "int": number and isinstance(value, int),
        "float": number, "str": isinstance(value, str), "dict": isinstance(value, dict),
        "Dict": isinstance(value, dict), "list": isinstance(value, list), "List": isinstance(value, list), "Any": True,
    }
    if name == "Literal" and isinstance(kind, ast.Subscript):
        options = kind.slice.elts if isinstance(kind.slice, ast.Tuple) else [kind.slice]
        return any(isinstance(o, ast.Constant) and type(o.value) is type(value) and o.value == value for o in options)
    return checks.get(name, False)


def _alternatives(node: ast.expr) -> list[ast.expr]:
    """The alternatives of an annotation: `A | B | None`, Optional[A], Union[A, B]."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _alternatives(node.left) + _alternatives(node.right)
    if isinstance(node, ast.Subscript) and _name(node.value) in ("Optional", "Union"):
        inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        extra = [ast.Constant(None)] if _name(node.value) == "Optional" else []
        return [each for part in inner for each in _alternatives(part)] + extra
    return [node]


def _name(node: ast.expr) -> str:
    """"int" of `int`, "Optional" of `typing.Optional`, "list" of `list[str]`, "None" of `None`."""
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant):
        return "None" if node.value is None else str(node.value)
    return ast.unparse(node)


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
