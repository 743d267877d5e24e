"""imitation.trainer: trl.SFTConfig's own keyword arguments, passed through to the student's training.

Covered:
- sft.sft_config_kwargs builds, for the shipped configs, exactly the SFTConfig keyword arguments the
  hand-written renaming built before imitation.trainer existed (values and types), and the real
  SFTConfig accepts them.
- a config without imitation.trainer trains with the paper's values; keys given replace only themselves.
- a new SFTConfig field (max_grad_norm) reaches the keyword arguments unchanged.
- config-load errors, one line "<file>: imitation.trainer.<key>: ...": an unknown key with a
  did-you-mean hint, a key lion-local sets itself naming where it comes from, a deprecated alias,
  a number written as text, and the old flat imitation keys naming their new place.
- SFTConfig's fields are dataclasses.fields(SFTConfig), read by a child process and cached, so
  loading a config imports neither trl, torch nor transformers; without trl the field check is skipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lion_local import trainer_settings
from lion_local.config import ConfigError, load_config
from lion_local.trainer_settings import LION_LOCAL_TRAINER_KEYS, PAPER_TRAINER
from lion_local.run.sft_job import SftJob
from lion_local.stages.sft import sft_config_kwargs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# What sft.train passed to SFTConfig for configs/tiny-cpu.yaml on a CPU, one process, before
# imitation.trainer (noted from the hand-written SFTConfig(...) call it replaced).
TINY_CPU_KWARGS = {
    "output_dir": "/run/iter_1/sft_checkpoints",
    "learning_rate": 1.0e-3,
    "num_train_epochs": 2.0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.0,
    "weight_decay": 0.0,
    "bf16": False,
    "activation_checkpointing": False,
    "max_length": 256,
    "completion_only_loss": True,
    "packing": False,
    "seed": 1,
    "data_seed": 1,
    "use_cpu": True,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 1,
    "logging_steps": 10,
    "report_to": "tensorboard",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "model_init_kwargs": {"attn_implementation": "sdpa"},
}

# The same for configs/lion-7b.yaml on 8 GPUs.
LION_7B_KWARGS = {
    **TINY_CPU_KWARGS,
    "learning_rate": 2.0e-5,
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "warmup_steps": 0.03,
    "bf16": True,
    "activation_checkpointing": True,
    "max_length": 1024,
    "use_cpu": False,
    "model_init_kwargs": {"attn_implementation": "flash_attention_2"},
}


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str, path: Path = CONFIGS / "tiny-cpu.yaml"):
    monkeypatch.chdir(ROOT)  # the config's relative paths are relative to the project root
    return load_config(path, [f"run_dir={tmp_path / 'run'}", *overrides])


def _job(config, tensorboard: bool = True) -> SftJob:
    """A job file (lion_local.stages.imitation.train_student) with the parts the kwargs come from;
    the paths the kwargs do not read are left empty."""
    return SftJob(
        base_model="", data_file="", output_dir="", progress_file="", result_file="", adapter_init=None,
        work_dir="/run/iter_1/sft_checkpoints",
        tensorboard_dir="/run/tensorboard/iter_1" if tensorboard else None,
        seed=1,
        imitation=config.imitation.model_dump(mode="json"),
    )


def _types(kwargs: dict) -> dict:
    return {key: type(value) for key, value in kwargs.items()}


def _without_trainer(tmp_path: Path) -> Path:
    data = yaml.safe_load((CONFIGS / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    del data["imitation"]["trainer"]
    path = tmp_path / "no-trainer.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str, path: Path = CONFIGS / "tiny-cpu.yaml"):
    """The one-line ConfigError message of loading the config."""
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, monkeypatch, *overrides, path=path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# The keyword arguments SFTConfig gets
# ----------------------------------------------------------------------------------------------


def test_tiny_cpu_kwargs_are_the_ones_built_before(tmp_path, monkeypatch):
    kwargs = sft_config_kwargs(_job(_config(tmp_path, monkeypatch)), 1, False, "sdpa")
    assert kwargs == TINY_CPU_KWARGS
    assert _types(kwargs) == _types(TINY_CPU_KWARGS)  # warmup_steps stays a float: a share of all steps


def test_tiny_cpu_kwargs_without_tensorboard(tmp_path, monkeypatch):
    kwargs = sft_config_kwargs(_job(_config(tmp_path, monkeypatch), tensorboard=False), 1, False, "sdpa")
    assert kwargs == {**TINY_CPU_KWARGS, "report_to": "none"}


def test_lion_7b_kwargs_on_8_gpus_are_the_ones_built_before(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, path=CONFIGS / "lion-7b.yaml")
    kwargs = sft_config_kwargs(_job(config), 8, True, "flash_attention_2")
    assert kwargs == LION_7B_KWARGS
    assert _types(kwargs) == _types(LION_7B_KWARGS)


def test_bf16_only_on_a_gpu(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "imitation.trainer.bf16=true")
    assert sft_config_kwargs(_job(config), 1, False, "sdpa")["bf16"] is False
    assert sft_config_kwargs(_job(config), 1, True, "sdpa")["bf16"] is True


def test_a_new_sft_config_key_passes_through(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "imitation.trainer.max_grad_norm=0.5", "imitation.trainer.optim=adafactor")
    kwargs = sft_config_kwargs(_job(config), 1, False, "sdpa")
    assert kwargs == {**TINY_CPU_KWARGS, "max_grad_norm": 0.5, "optim": "adafactor"}


def test_without_imitation_trainer_the_paper_values(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, path=_without_trainer(tmp_path))
    assert config.imitation.trainer == {
        "learning_rate": 2e-5,
        "num_train_epochs": 3.0,
        "per_device_train_batch_size": 4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "max_length": 1024,
        "bf16": True,
        "activation_checkpointing": False,
        "save_steps": 200,
        "logging_steps": 10,
    }
    kwargs = sft_config_kwargs(_job(config), 8, True, "flash_attention_2")
    # tiny-cpu's effective batch of 8 over 8 GPUs x 4: one step (rounded up, with a warning).
    assert kwargs == {**LION_7B_KWARGS, "activation_checkpointing": False, "gradient_accumulation_steps": 1}


def test_keys_given_replace_only_themselves(tmp_path, monkeypatch):
    without = _without_trainer(tmp_path)
    config = _config(tmp_path, monkeypatch, "imitation.trainer={learning_rate: 1.0e-4}", path=without)
    assert config.imitation.trainer == {**PAPER_TRAINER, "learning_rate": 1e-4}


def test_the_real_sft_config_accepts_the_kwargs(tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    kwargs = sft_config_kwargs(_job(_config(tmp_path, monkeypatch), tensorboard=False), 1, False, "sdpa")
    sft_config = trl.SFTConfig(**{**kwargs, "output_dir": str(tmp_path / "work")})
    assert (sft_config.learning_rate, sft_config.max_length, sft_config.warmup_steps) == (1e-3, 256, 0.0)
    assert (sft_config.activation_checkpointing, sft_config.bf16, sft_config.use_cpu) == (False, False, True)


# ----------------------------------------------------------------------------------------------
# Errors at config load
# ----------------------------------------------------------------------------------------------


def test_unknown_key_is_named_with_a_hint(tmp_path, monkeypatch):
    message = _error(tmp_path, monkeypatch, "imitation.trainer.learning_rat=1.0e-3")
    assert message == (
        "--set: imitation.trainer.learning_rat: not a field of trl's SFTConfig (did you mean 'learning_rate'?)"
    )


def test_unknown_key_names_its_file(tmp_path, monkeypatch):
    data = yaml.safe_load((CONFIGS / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    data["imitation"]["trainer"]["max_grad_nrom"] = 1.0
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    message = _error(tmp_path, monkeypatch, path=path)
    assert message.startswith(f"{path}: imitation.trainer.max_grad_nrom: not a field of trl's SFTConfig")
    assert "did you mean 'max_grad_norm'?" in message


def test_an_old_name_inside_trainer_points_at_the_new_one(tmp_path, monkeypatch):
    message = _error(tmp_path, monkeypatch, "imitation.trainer.warmup_ratio=0.03")
    assert "imitation.trainer.warmup_ratio: not a field of trl's SFTConfig (did you mean 'warmup_steps'?" in message
    message = _error(tmp_path, monkeypatch, "imitation.trainer.max_seq_length=512")
    assert message.endswith(
        "imitation.trainer.max_seq_length: not a field of trl's SFTConfig (did you mean 'max_length'?)"
    )


@pytest.mark.parametrize("key", sorted(LION_LOCAL_TRAINER_KEYS))
def test_keys_lion_local_sets_are_refused(tmp_path, monkeypatch, key: str):
    message = _error(tmp_path, monkeypatch, f"imitation.trainer.{key}=1")
    assert message.startswith(f"--set: imitation.trainer.{key}: lion-local sets this key itself: ")
    assert message.endswith(LION_LOCAL_TRAINER_KEYS[key])


def test_gradient_accumulation_names_effective_batch_size(tmp_path, monkeypatch):
    message = _error(tmp_path, monkeypatch, "imitation.trainer.gradient_accumulation_steps=4")
    assert "imitation.trainer.gradient_accumulation_steps:" in message and "imitation.effective_batch_size" in message


def test_refused_keys_are_the_keys_sft_sets(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    set_by_lion_local = set(sft_config_kwargs(_job(config), 1, False, "sdpa")) - set(config.imitation.trainer)
    # resume_from_checkpoint goes to trainer.train(), not SFTConfig; bf16 comes from the config (GPU only).
    assert set_by_lion_local == set(LION_LOCAL_TRAINER_KEYS) - {"resume_from_checkpoint"}


def test_deprecated_alias_is_refused(tmp_path, monkeypatch):
    message = _error(tmp_path, monkeypatch, "imitation.trainer.gradient_checkpointing=true")
    assert message.endswith(
        "imitation.trainer.gradient_checkpointing: a deprecated alias in trl; "
        "set imitation.trainer.activation_checkpointing instead"
    )


def test_a_number_written_as_text_is_refused(tmp_path, monkeypatch):
    message = _error(tmp_path, monkeypatch, "imitation.trainer.learning_rate=2e-5")  # YAML 1.1: a string
    assert message.startswith("--set: imitation.trainer.learning_rate: expects a number, got the string '2e-5'")


@pytest.mark.parametrize(
    "old, new",
    [
        ("learning_rate", "learning_rate"),
        ("max_seq_length", "max_length"),
        ("per_device_batch_size", "per_device_train_batch_size"),
        ("warmup_ratio", "warmup_steps"),
        ("bf16", "bf16"),
        ("gradient_checkpointing", "activation_checkpointing"),
        ("save_steps", "save_steps"),
    ],
)
def test_old_flat_keys_name_their_new_place(tmp_path, monkeypatch, old: str, new: str):
    message = _error(tmp_path, monkeypatch, f"imitation.{old}=1")
    assert message == f"--set: imitation.{old}: now imitation.trainer.{new} (trl's SFTConfig field)"


def test_trainer_must_be_a_mapping(tmp_path, monkeypatch):
    message = _error(tmp_path, monkeypatch, "imitation.trainer=[1, 2]")
    assert message.startswith("--set: key 'imitation.trainer': ")


# ----------------------------------------------------------------------------------------------
# SFTConfig's fields, without importing trl
# ----------------------------------------------------------------------------------------------


def test_fields_read_from_the_sources_are_sft_configs_fields():
    import dataclasses

    trl = pytest.importorskip("trl")
    assert set(trainer_settings.sft_config_fields()) == {field.name for field in dataclasses.fields(trl.SFTConfig)}


def test_loading_a_config_imports_neither_trl_nor_torch():
    code = (
        "import sys; from lion_local.config import load_config; load_config('configs/tiny-cpu.yaml'); "
        "from lion_local.trainer_settings import sft_config_fields; assert sft_config_fields(); "
        "print(sorted(m for m in ('trl', 'torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture
def without_trl(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    trainer_settings.sft_config_fields.cache_clear()
    yield
    monkeypatch.undo()
    trainer_settings.sft_config_fields.cache_clear()


def test_without_trl_the_field_check_is_skipped(tmp_path, monkeypatch, without_trl):
    assert trainer_settings.sft_config_fields() is None
    config = _config(tmp_path, monkeypatch, "imitation.trainer.learning_rat=1.0e-3")
    assert config.imitation.trainer["learning_rat"] == 1e-3
    # What lion-local sets itself is refused all the same.
    assert "lion-local sets this key itself" in _error(tmp_path, monkeypatch, "imitation.trainer.seed=3")


# ----------------------------------------------------------------------------------------------
# Values: SFTConfig's types, every float finite, the ranges that matter (CLI cases: tests/test_input_bounds.py)
# ----------------------------------------------------------------------------------------------


def test_every_ranged_key_is_a_numeric_sft_config_field():
    fields = trainer_settings.sft_config_fields()
    if fields is None:
        pytest.skip("trl is not installed")
    absent = {"warmup_ratio"}  # a field of older trl versions (now warmup_steps below 1)
    for key in set(trainer_settings.TRAINER_RANGES) - absent:
        assert key in fields, key
        assert {"int", "float"} & set(fields[key].annotation.replace(" ", "").split("|")), (key, fields[key])


def test_the_paper_settings_and_the_shipped_configs_pass(tmp_path, monkeypatch):
    assert trainer_settings.trainer_problem(dict(PAPER_TRAINER)) is None
    for path in (CONFIGS / "tiny-cpu.yaml", CONFIGS / "lion-7b.yaml", CONFIGS / "smollm2-cpu.yaml"):
        _config(tmp_path, monkeypatch, path=path)


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("num_train_epochs=-1", "imitation.trainer.num_train_epochs: must be > 0 (or set max_steps > 0), got -1"),
        ("num_train_epochs=0", "imitation.trainer.num_train_epochs: must be > 0"),
        ("per_device_train_batch_size=0", "imitation.trainer.per_device_train_batch_size: must be >= 1, got 0"),
        ("learning_rate=.nan", "imitation.trainer.learning_rate: must be a finite number, got nan"),
        ("max_length=0", "imitation.trainer.max_length: must be >= 1, got 0"),
        ("adam_beta2=1", "imitation.trainer.adam_beta2: must be in [0, 1), got 1"),
        ("per_device_train_batch_size=true", "expects an integer, got bool True"),
        ("max_length=[1]", "imitation.trainer.max_length: expects an integer or null, got list [1]"),
        ("lr_scheduler_type=3", "imitation.trainer.lr_scheduler_type: expects"),
        ("lr_scheduler_type=cosinus", "imitation.trainer.lr_scheduler_type: must be one of"),
        ("optim=adamw", "imitation.trainer.optim: 'adamw' is not one of its"),
    ],
)
def test_bad_values_are_refused_at_config_load(tmp_path, monkeypatch, setting: str, expected: str):
    message = _error(tmp_path, monkeypatch, f"imitation.trainer.{setting}")
    assert message.startswith(f"--set: imitation.trainer.{setting.split('=')[0]}: ") and expected in message, message


@pytest.mark.parametrize(
    "setting",
    ["max_length=null", "num_train_epochs=1", "max_steps=-1", "lr_scheduler_type=linear", "optim=adamw_torch",
     "warmup_steps=10", "max_grad_norm=0"],
)
def test_good_values_pass(tmp_path, monkeypatch, setting: str):
    _config(tmp_path, monkeypatch, f"imitation.trainer.{setting}")


def test_zero_epochs_with_max_steps(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "imitation.trainer.num_train_epochs=0", "imitation.trainer.max_steps=5")
    assert (config.imitation.trainer["num_train_epochs"], config.imitation.trainer["max_steps"]) == (0, 5)


def test_without_trl_the_ranges_still_apply(tmp_path, monkeypatch, without_trl):
    assert "must be >= 1" in _error(tmp_path, monkeypatch, "imitation.trainer.per_device_train_batch_size=0")
