"""LoRA students (imitation.peft; lion_local/stages/lora.py): config, which checkpoint and adapter each
imitation continues from, the adapter's parameter count, and the vLLM command that serves an adapter.
The smoke runs with each serving choice: tests/test_vllm.py (adapter) and tests/test_slurm.py (merged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lion_local.config import ConfigError, load_config
from lion_local.run.layout import FINAL, Iteration, RunDir, is_checkpoint
from lion_local.stages.imitation import adapter_init, base_checkpoint
from lion_local.stages.lora import lora_parameter_count
from serving.commands import vllm_command

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, *overrides: str, base: str = "configs/tiny-cpu.yaml"):
    return load_config(ROOT / base, [f"run_dir={tmp_path / 'run'}", *overrides])


def _adapter(directory: Path, rank: int = 4, base: str = "/models/student") -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": rank, "base_model_name_or_path": base}))
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def test_the_config_section_and_its_checks(tmp_path):
    assert _config(tmp_path).imitation.peft is None  # full weights unless asked
    lora = _config(tmp_path, "imitation.peft.rank=8").imitation.peft
    assert (lora.rank, lora.alpha, lora.serve, lora.target_modules) == (8, 32.0, "merged", ["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(ConfigError, match=r"imitation\.peft\.serve: adapter checkpoints are served by vLLM.*use serve: merged"):
        _config(tmp_path, "imitation.peft.serve=adapter", base="configs/tiny-cpu-transformers.yaml")
    with pytest.raises(ConfigError, match="imitation.peft.rnak"):
        _config(tmp_path, "imitation.peft.rnak=8")


def test_each_imitation_continues_the_previous_adapter_on_the_same_base(tmp_path):
    config = _config(tmp_path, "imitation.peft.serve=merged")
    run = RunDir(config.run_dir)
    base = str(config.servers["student"].model)
    assert base_checkpoint(config, run, Iteration(1)) == base and adapter_init(config, run, Iteration(1)) is None
    _adapter(run.iteration(1).student / "adapter")
    assert base_checkpoint(config, run, Iteration(2)) == base
    assert adapter_init(config, run, Iteration(2)) == str(run.iteration(1).student / "adapter")
    _adapter(run.iteration(2).student / "adapter")
    assert adapter_init(config, run, FINAL) == str(run.iteration(config.iterations).student / "adapter")

    served = _config(tmp_path / "served", "imitation.peft.serve=adapter")
    served_run = RunDir(served.run_dir)
    _adapter(served_run.iteration(1).student, rank=4)
    assert adapter_init(served, served_run, Iteration(2)) == str(served_run.iteration(1).student)
    assert is_checkpoint(served_run.iteration(1).student)  # an adapter alone is a finished student

    full = _config(tmp_path)
    assert base_checkpoint(full, run, Iteration(2)) == str(run.iteration(1).student)  # unchanged
    assert adapter_init(full, run, Iteration(2)) is None


@pytest.mark.integration
def test_the_parameter_count_matches_peft_on_the_tiny_student(tiny_models: Path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    for rank, modules in ((4, ["q_proj", "v_proj"]), (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])):
        model = AutoModelForCausalLM.from_pretrained(tiny_models / "student")
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules=modules, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert lora_parameter_count(tiny_models / "student", rank, modules) == trainable
    assert lora_parameter_count(tiny_models / "student", 4, ["no_such_proj"]) is None
    assert lora_parameter_count(tiny_models / "missing", 4, ["q_proj"]) is None


def test_an_adapter_checkpoint_is_served_on_its_base_with_enable_lora(tmp_path):
    student = _config(tmp_path).servers["student"]
    for rank, max_rank in ((4, "8"), (8, "8"), (12, "16"), (64, "64")):
        adapter = _adapter(tmp_path / f"r{rank}" / "student", rank=rank)
        command = vllm_command(student, "127.0.0.1", 8000, model=str(adapter))
        assert command[command.index("--model") + 1] == "/models/student"
        assert command[command.index("--served-model-name") + 1] == "student-base"
        assert command[command.index("--lora-modules") + 1] == f"student={adapter}"
        assert command[command.index("--max-lora-rank") + 1] == max_rank
    full = vllm_command(student, "127.0.0.1", 8000, model=str(tmp_path))
    assert "--enable-lora" not in full and full[full.index("--model") + 1] == str(tmp_path)


@pytest.mark.integration
def test_plan_shows_the_trainable_parameters(tmp_path, tiny_models: Path):
    from lion_local.commands.plan import build_plan, plan_lines

    config = _config(tmp_path, f"servers.student.model={tiny_models / 'student'}",
                     "imitation.peft={rank: 4, target_modules: [q_proj, v_proj], serve: adapter}")
    plan = build_plan(config)
    expected = lora_parameter_count(tiny_models / "student", 4, ["q_proj", "v_proj"])
    assert plan["student_training"] == {"mode": "LoRA rank 4 (adapter)", "trainable_parameters": expected}
    assert f"student training: LoRA rank 4 (adapter), {expected:,} trainable parameters per imitation" in plan_lines(plan)
