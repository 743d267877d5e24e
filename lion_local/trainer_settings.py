"""imitation.trainer: TRL's SFTConfig settings, passed through; the paper's defaults and their rules.

The config names trainer settings by SFTConfig's own field names, so a new trainer option needs
no change here. Loading a config must stay fast, and importing trl imports torch (seconds), so
SFTConfig's fields are read from the installed sources with `ast` instead, following its base
classes (transformers' TrainingArguments) through their imports.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from pathlib import Path
from typing import Any


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


def _dataclass_fields(module: str, name: str, depth: int = 0) -> dict[str, str]:
    """Field name -> annotation (source text) of class `name` as seen from `module`, bases included."""
    if depth > 12:
        raise LookupError(name)
    path, tree = _parsed(module)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields: dict[str, str] = {}
            for base in reversed(node.bases):
                if isinstance(base, ast.Name) and base.id != "object":
                    fields.update(_dataclass_fields(module, base.id, depth + 1))
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    annotation = ast.unparse(statement.annotation)
                    if not annotation.startswith(("ClassVar", "typing.ClassVar", "InitVar")):
                        fields[statement.target.id] = annotation
            return fields
    for node in ast.walk(tree):  # re-exported: follow the import (lazy packages import under TYPE_CHECKING)
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _dataclass_fields(_imported_from(module, path, node), alias.name, depth + 1)
    raise LookupError(name)


@functools.lru_cache(maxsize=1)
def sft_config_fields() -> dict[str, str] | None:
    """trl.SFTConfig's fields and their annotations, read from the installed sources (importing trl
    would import torch, seconds on every command); None when trl is not installed or unreadable."""
    try:
        return _dataclass_fields("trl", "SFTConfig")
    except (LookupError, OSError, SyntaxError, ValueError, ImportError):
        return None


def trainer_key_problem(key: str, value: Any, fields: dict[str, str] | None) -> str | None:
    """Why `key` (with `value`) cannot be an imitation.trainer setting, or None when it can."""
    if key in LION_LOCAL_TRAINER_KEYS:
        return f"lion-local sets this key itself: {LION_LOCAL_TRAINER_KEYS[key]}"
    if key in ALIASED_TRAINER_KEYS:
        return f"a deprecated alias in trl; set imitation.trainer.{ALIASED_TRAINER_KEYS[key]} instead"
    if fields is None:
        return None  # trl is not installed: the training process says so
    if key not in fields:
        renamed = MOVED_IMITATION_KEYS.get(key)
        close = [renamed] if renamed in fields else difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if close == ["warmup_steps"]:
            hint = " (did you mean 'warmup_steps'? a float below 1 is a share of all steps)"
        return f"not a field of trl's SFTConfig{hint}"
    kinds = {part.strip() for part in fields[key].split("|")} - {"None"}
    if isinstance(value, str) and kinds and kinds <= {"int", "float"}:
        return f"expects a number, got the string {value!r} (YAML reads 2e-5 as text; write 2.0e-5)"
    return None
