"""How the imitation stage launches and feeds student training, without training anything.

Covered:
- training_launch.local_training_command: without an accelerate file, the training process itself (exact
  argument list, on a CPU or GPU machine alike); `accelerate launch --config_file` when
  imitation.accelerate_config is set.
- sft.launched_world_size: torchrun's WORLD_SIZE, else an MPI launcher's (what accelerate reads).
- training_launch.check_launch_settings / training_environment: configs/accelerate/cpu-ddp.yaml is
  launched as written (its use_cpu hides the GPUs), the GPU files on GPUs; FSDP on the CPU (use_cpu,
  or no GPU) and MULTI_CPU with several processes but no mpirun are refused in one line (exit 2).
- sft.gradient_accumulation_steps: exact division and rounding up.
- imitation.training_examples: alpaca rows whose prompt is exactly the inference prompt
  (student_prompt) and whose completion is answer + eos; chat rows built from
  student_chat_messages; records whose teacher answer is empty are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lion_local.config import ConfigError, load_config
from lion_local.stages.imitation import training_examples
from lion_local.run.records import instruction_record
from lion_local.roles.student import student_chat_messages, student_prompt
from lion_local.stages.sft import gradient_accumulation_steps, launched_world_size
from lion_local.stages.training_launch import local_training_command, check_launch_settings, training_environment

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str):
    monkeypatch.chdir(ROOT)  # the config's relative paths are relative to the project root
    return load_config("configs/tiny-cpu.yaml", [f"run_dir={tmp_path / 'run'}", *overrides])


# ----------------------------------------------------------------------------------------------
# local_training_command
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cuda", [False, True])
def test_without_an_accelerate_file_the_training_process_runs_directly(tmp_path, monkeypatch, cuda: bool):
    # One process, no launcher in front of it; bf16 is the trainer's own setting (sft.py: on a GPU only).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    config = _config(tmp_path, monkeypatch, "imitation.trainer.bf16=true")
    job_file = tmp_path / "run" / "iter_1" / "sft_job.json"
    assert local_training_command(config, job_file) == [sys.executable, "-m", "lion_local.stages.sft", str(job_file)]


@pytest.mark.parametrize("cuda", [False, True])
def test_local_training_command_with_a_config_file(tmp_path, monkeypatch, cuda: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    config = _config(tmp_path, monkeypatch, "imitation.accelerate_config=configs/accelerate/fsdp.yaml")
    accelerate_file = str(ROOT / "configs" / "accelerate" / "fsdp.yaml")
    assert config.imitation.accelerate_config == accelerate_file  # resolved against the project root
    job_file = tmp_path / "job.json"
    command = local_training_command(config, job_file)
    assert Path(command[0]).name == "accelerate"
    assert command[1:] == ["launch", "--config_file", accelerate_file, "-m", "lion_local.stages.sft", str(job_file)]


@pytest.mark.parametrize("world, expected", [({}, 1), ({"WORLD_SIZE": "2"}, 2), ({"PMI_SIZE": "4"}, 4),
                                             ({"OMPI_COMM_WORLD_SIZE": "3"}, 3), ({"WORLD_SIZE": "2", "PMI_SIZE": "4"}, 2)])
def test_launched_world_size_reads_torchrun_then_mpi(monkeypatch, world: dict, expected: int):
    for variable in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in world.items():
        monkeypatch.setenv(variable, value)
    assert launched_world_size() == expected


# ----------------------------------------------------------------------------------------------
# check_launch_settings, training_environment: accelerate files that would not train as written
# ----------------------------------------------------------------------------------------------


def _accelerate_file(tmp_path: Path, **settings) -> str:
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "num_machines": 1, **settings}))
    return str(path)


@pytest.mark.parametrize("on_gpu", [False, True])
def test_the_cpu_ddp_file_is_launched_as_written(tmp_path, monkeypatch, on_gpu: bool):
    config = _config(tmp_path, monkeypatch, "imitation.accelerate_config=configs/accelerate/cpu-ddp.yaml")
    check_launch_settings(config, on_gpu=on_gpu)
    assert training_environment(config) == {"CUDA_VISIBLE_DEVICES": ""}  # use_cpu: the GPUs stay hidden
    command = local_training_command(config, tmp_path / "job.json")
    assert command[1:4] == ["launch", "--config_file", str(ROOT / "configs/accelerate/cpu-ddp.yaml")]


def test_the_gpu_files_pass_on_a_gpu_machine_and_keep_the_gpus_visible(tmp_path, monkeypatch):
    for name in ("fsdp.yaml", "deepspeed-zero3.yaml"):
        config = _config(tmp_path, monkeypatch, f"imitation.accelerate_config=configs/accelerate/{name}")
        check_launch_settings(config, on_gpu=True)
        assert training_environment(config) == {}
    assert training_environment(_config(tmp_path, monkeypatch)) == {}


def test_fsdp_on_the_cpu_is_refused(tmp_path, monkeypatch):
    import accelerate

    config = _config(tmp_path, monkeypatch, "imitation.accelerate_config=configs/accelerate/fsdp.yaml")
    with pytest.raises(ConfigError) as refused:
        check_launch_settings(config, on_gpu=False)
    fsdp = ROOT / "configs/accelerate/fsdp.yaml"
    assert str(refused.value) == (
        f"imitation.accelerate_config: {fsdp}: FSDP cannot train on the CPU (torch sees no GPU on this machine): "
        f"accelerate {accelerate.__version__} turns FSDP on for GPUs only and would train with plain DDP over gloo, "
        "each process holding the whole model; use configs/accelerate/cpu-ddp.yaml for several CPU processes, or "
        "train with this file on GPUs"
    )
    assert refused.value.exit_code == 2
    on_cpu = _accelerate_file(tmp_path, distributed_type="FSDP", use_cpu=True, num_processes=2)
    with pytest.raises(ConfigError, match=r"FSDP cannot train on the CPU \(use_cpu: true\)"):
        check_launch_settings(_config(tmp_path, monkeypatch, f"imitation.accelerate_config={on_cpu}"), on_gpu=True)


@pytest.mark.parametrize("settings, refused", [
    ({"num_processes": 2}, True),
    ({"num_processes": 2, "mpirun_hostfile": "/etc/hosts"}, False),  # mpirun starts the processes
    ({"num_processes": 1}, False),
])
def test_multi_cpu_with_several_processes_needs_mpirun(tmp_path, monkeypatch, settings: dict, refused: bool):
    path = _accelerate_file(tmp_path, distributed_type="MULTI_CPU", use_cpu=True, **settings)
    config = _config(tmp_path, monkeypatch, f"imitation.accelerate_config={path}")
    if not refused:
        check_launch_settings(config, on_gpu=False)
        return
    with pytest.raises(ConfigError) as error:
        check_launch_settings(config, on_gpu=False)
    assert str(error.value).startswith(
        f"imitation.accelerate_config: {path}: distributed_type MULTI_CPU with num_processes 2 starts one process "
        "under accelerate launch unless mpirun starts them (mpirun_hostfile), so training would run in 1; "
    )


# ----------------------------------------------------------------------------------------------
# gradient_accumulation_steps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "effective, per_device, world, expected",
    [
        (128, 4, 8, 4),  # the paper's batch on 8 GPUs
        (128, 4, 1, 32),
        (8, 8, 1, 1),  # the tiny-cpu config
        (100, 4, 8, 4),  # 100 / 32 = 3.125, rounded up
        (129, 4, 8, 5),
        (10, 4, 1, 3),
        (2, 4, 1, 1),  # smaller than one step: never 0
        (1, 16, 8, 1),
    ],
)
def test_gradient_accumulation_steps(effective: int, per_device: int, world: int, expected: int):
    steps = gradient_accumulation_steps(effective, per_device, world)
    assert steps == expected
    assert steps * per_device * world >= effective


def test_gradient_accumulation_warns_only_when_not_divisible(caplog):
    with caplog.at_level("WARNING", logger="lion_local.stages.sft"):
        gradient_accumulation_steps(128, 4, 8)
    assert caplog.records == []
    with caplog.at_level("WARNING", logger="lion_local.stages.sft"):
        gradient_accumulation_steps(100, 4, 8)
    assert len(caplog.records) == 1 and "128" in caplog.records[0].getMessage()


# ----------------------------------------------------------------------------------------------
# training_examples
# ----------------------------------------------------------------------------------------------

RECORDS = [
    instruction_record("Write a haiku about rain.", "", "seed", 0, None),
    instruction_record("Translate the sentence into French.", "Good morning.", "seed", 0, None),
    instruction_record("Explain what a compass does.", "", "hard", 1, "abc"),
]


def _answers(*texts: str | None) -> dict[str, dict]:
    """Teacher-cache records by id; None makes an empty answer (what the teacher-answer cache writes)."""
    return {
        record["id"]: {"id": record["id"], "answer": text or "", "empty": text is None, "finish_reason": "stop"}
        for record, text in zip(RECORDS, texts)
    }


def test_training_examples_alpaca_use_the_inference_prompt_and_append_eos(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    assert config.roles.student.prompt_format == "alpaca"
    answers = _answers("Soft rain on the roof.", "Bonjour.", "It points north.")
    examples = training_examples(config, RECORDS, answers, "</s>")
    assert [e["id"] for e in examples] == [r["id"] for r in RECORDS]
    for example, record in zip(examples, RECORDS):
        assert example["prompt"] == student_prompt(record["instruction"], record["input"])
        assert example["completion"] == answers[record["id"]]["answer"] + "</s>"
        assert set(example) == {"id", "prompt", "completion"}
    assert examples[1]["prompt"].endswith("### Input:\nGood morning.\n\n### Response:\n")
    assert "### Input:" not in examples[0]["prompt"]


def test_training_examples_skip_empty_answers(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    answers = _answers("Soft rain on the roof.", None, "It points north.")
    examples = training_examples(config, RECORDS, answers, "<|eos|>")
    assert [e["id"] for e in examples] == [RECORDS[0]["id"], RECORDS[2]["id"]]
    assert examples[1]["completion"] == "It points north.<|eos|>"
    assert training_examples(config, RECORDS, _answers(None, None, None), "</s>") == []
    assert training_examples(config, [], {}, "</s>") == []


def test_training_examples_with_an_empty_eos(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    examples = training_examples(config, RECORDS[:1], _answers("Soft rain."), "")
    assert examples[0]["completion"] == "Soft rain."


def test_training_examples_chat_format(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "roles.student.prompt_format=chat")
    answers = _answers("Soft rain on the roof.", None, "It points north.")
    examples = training_examples(config, RECORDS, answers, "</s>")
    assert [e["id"] for e in examples] == [RECORDS[0]["id"], RECORDS[2]["id"]]
    for example, record in zip(examples, (RECORDS[0], RECORDS[2])):
        assert example["prompt"] == student_chat_messages(record["instruction"], record["input"])
        assert example["completion"] == [{"role": "assistant", "content": answers[record["id"]]["answer"]}]
    assert examples[0]["prompt"] == [{"role": "user", "content": "Write a haiku about rain."}]
    answer = {RECORDS[1]["id"]: {"answer": "Bonjour.", "empty": False}}
    with_input = training_examples(config, RECORDS[1:2], answer, "</s>")
    assert with_input[0]["prompt"] == [
        {"role": "user", "content": "Translate the sentence into French.\n\nGood morning."}
    ]
    assert with_input[0]["completion"] == [{"role": "assistant", "content": "Bonjour."}]  # no eos: the template adds it
