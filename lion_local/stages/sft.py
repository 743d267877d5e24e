"""Student fine-tuning with TRL's SFTTrainer; run by the imitation stage (training_launch.py).

    python -m lion_local.stages.sft <job.json>                      (one process)
    accelerate launch --config_file F -m lion_local.stages.sft <job.json>   (an accelerate file)

The job file (an SftJob, lion_local/run/sft_job.py, written by lion_local.stages.imitation) names
the base checkpoint, the prompt/completion dataset, the imitation section (its `trainer` mapping
reaches trl's SFTConfig unchanged, next to the keys lion-local sets: sft_config_kwargs) and where
to write; a damaged job file is refused in one line (exit 2). The dataset's prompts come from the same
`student_prompt` function the student is queried with, and the loss is on the completion (the
teacher's answer) only. Trainer checkpoints under `work_dir` let a killed training resume; the
finished model and its tokenizer are saved (safetensors) to `output_dir`, which the parent
process renames into place once this process has exited cleanly. Loss, learning rate and
gradient norm go to TensorBoard event files in `tensorboard_dir` (under the run directory).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from lion_local.run.sft_job import SftJob, SftJobError

logger = logging.getLogger(__name__)


def gradient_accumulation_steps(effective_batch_size: int, per_device_train_batch_size: int, world_size: int) -> int:
    """Accumulation so that per_device x world x accumulation reaches the effective batch (rounded up)."""
    per_step = per_device_train_batch_size * world_size
    steps = max(1, math.ceil(effective_batch_size / per_step))
    if steps * per_step != effective_batch_size:
        logger.warning(
            "effective batch %d is not a multiple of %d (per-device batch x %d processes); using %d",
            effective_batch_size,
            per_step,
            world_size,
            steps * per_step,
        )
    return steps


def attention_implementation() -> str:
    """flash-attn on CUDA machines that have it (the gpu extra), PyTorch's SDPA otherwise."""
    import torch

    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def last_complete_checkpoint(work_dir: Path, remove_incomplete: bool = False) -> Path | None:
    """The newest trainer checkpoint that was written to the end (newer incomplete ones removed).

    The Trainer writes trainer_state.json after the weights, optimizer and RNG states, so a
    checkpoint without a readable one was cut short by a kill and cannot be resumed from.
    """
    import shutil

    def step(path: Path) -> int:
        suffix = path.name.removeprefix("checkpoint-")
        return int(suffix) if suffix.isdigit() else -1

    complete = None
    for checkpoint in sorted(work_dir.glob("checkpoint-*"), key=step, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            readable = any(checkpoint.glob("*.safetensors"))
        except (OSError, ValueError):
            readable = False
        if complete is None and readable:
            complete = checkpoint
        elif complete is None and remove_incomplete:
            logger.warning("removing the incomplete trainer checkpoint %s", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return complete


def _write_json(path: Path, payload: dict) -> None:
    from lion_local.run.state import write_atomic

    write_atomic(path, json.dumps(payload, indent=2) + "\n")


def sft_config_kwargs(job: SftJob, world_size: int, on_gpu: bool, attn_implementation: str) -> dict:
    """trl.SFTConfig's keyword arguments: imitation.trainer unchanged, then what lion-local decides
    (from the job's imitation, work_dir, seed and tensorboard_dir).

    The config refuses the keys set here in imitation.trainer (trainer_settings.LION_LOCAL_TRAINER_KEYS),
    so nothing below overrides a configured value; bf16 is honoured on a GPU only.
    """
    imitation = job.imitation
    trainer = imitation["trainer"]
    padding_free = bool(trainer.get("padding_free", False))
    return {
        **trainer,
        "bf16": bool(trainer.get("bf16", False)) and on_gpu,
        "output_dir": job.work_dir,
        "gradient_accumulation_steps": gradient_accumulation_steps(
            imitation["effective_batch_size"], trainer["per_device_train_batch_size"], world_size
        ),
        "completion_only_loss": True,
        # padding_free: TRL keeps max_length only by packing, so whole examples are packed best-fit
        # into max_length rows, each attending to itself alone; the loss stays on the answers.
        "packing": padding_free,
        **({"packing_strategy": "bfd"} if padding_free else {}),
        "seed": job.seed,
        "data_seed": job.seed,
        "use_cpu": not on_gpu,
        "save_strategy": "steps",
        "save_total_limit": 1,
        "report_to": "tensorboard" if job.tensorboard_dir else "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "model_init_kwargs": {"attn_implementation": attn_implementation},
    }


def progress_callback(progress_path: Path):
    """A TrainerCallback that lets the parent process draw a progress bar and `lion-local status` report steps."""
    from transformers import TrainerCallback

    class ProgressFile(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                loss = (logs or {}).get("loss")
                _write_json(progress_path, {"step": state.global_step, "max_steps": state.max_steps, "loss": loss})

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                _write_json(progress_path, {"step": state.global_step, "max_steps": state.max_steps})

    return ProgressFile()


def train(job: SftJob) -> dict:
    """Fine-tune the job's base model on its dataset, resuming from a complete checkpoint; return a summary."""
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    world_size = launched_world_size()
    on_gpu = torch.cuda.is_available()  # decided by torch, never by CUDA_VISIBLE_DEVICES
    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_dataset("json", data_files=job.data_file, split="train")
    if job.tensorboard_dir:
        # Loss and learning rate as event files in the run directory; nothing leaves the machine.
        os.environ["TENSORBOARD_LOGGING_DIR"] = job.tensorboard_dir
    logger.info("imitation.trainer: %s", json.dumps(job.imitation["trainer"], sort_keys=True))
    kwargs = sft_config_kwargs(job, world_size, on_gpu, attention_implementation())
    model, peft_config = job.base_model, None
    lora = job.imitation.get("peft")
    if lora:
        from lion_local.stages.lora import model_to_train

        model, peft_config = model_to_train(job, kwargs["model_init_kwargs"])
        if not isinstance(model, str):
            kwargs["model_init_kwargs"] = None  # TRL takes them only for a model it loads itself
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[progress_callback(Path(job.progress_file))],
    )
    _check_world(trainer, world_size)
    # Every process picks the same checkpoint; only the first one removes what was cut short.
    resume = last_complete_checkpoint(Path(job.work_dir), remove_incomplete=trainer.is_world_process_zero())
    if resume is not None:
        logger.info("resuming training from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    summary = _summary(trainer, result, len(dataset), resume is not None, world_size, on_gpu)
    if not lora:
        trainer.save_model(job.output_dir)
    elif trainer.is_world_process_zero():
        from lion_local.stages.lora import save_student

        save_student(trainer.model, Path(job.output_dir), lora["serve"])
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(job.output_dir)
    return summary


def launched_world_size() -> int:
    """The processes the launcher started: torchrun's WORLD_SIZE, or an MPI launcher's (read by
    accelerate in the same order), before accelerate sets up the process group."""
    for variable in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 1


def _check_world(trainer, world_size: int) -> None:
    """Log how this process trains; the accumulation was sized for `world_size` processes, so a
    trainer that joined another number of them would train with another effective batch."""
    state, args = trainer.accelerator.state, trainer.args
    logger.info(
        "process %d of %d: %s over %s on %s; per-device batch %d x %d processes x gradient accumulation %d = %d",
        state.process_index, state.num_processes, state.distributed_type.value, state.backend or "no backend",
        state.device,
        args.per_device_train_batch_size, state.num_processes, args.gradient_accumulation_steps,
        args.per_device_train_batch_size * state.num_processes * args.gradient_accumulation_steps,
    )
    if state.num_processes != world_size:
        raise RuntimeError(
            f"the launcher started {world_size} process(es) but accelerate joined {state.num_processes}; "
            "the gradient accumulation would not give imitation.effective_batch_size"
        )


def _summary(trainer, result, examples: int, resumed: bool, world_size: int, on_gpu: bool) -> dict:
    model, args, state = trainer.model, trainer.args, trainer.accelerator.state
    logged_tokens = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    return {
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": examples,
        "steps": trainer.state.global_step,
        # Tokens trained on, padding excluded (TRL's count, at the last logged step).
        "tokens": int(max(logged_tokens)) if logged_tokens else None,
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "resumed": resumed,
        "world_size": world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps,
        "distributed_type": state.distributed_type.value,
        "backend": state.backend,
        "device": "cuda" if on_gpu else "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    from serving.process import die_with_parent

    die_with_parent()  # a killed imitation stage must not leave training running
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        logger.error("usage: python -m lion_local.stages.sft <job.json>")
        return 2
    try:
        job = SftJob.read(Path(args[0]))
    except SftJobError as exc:
        logger.error("%s", exc)
        return 2
    summary = train(job)
    if int(os.environ.get("RANK", "0")) == 0:
        _write_json(Path(job.result_file), summary)
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """With several processes: wait until every one has written its part, then leave the process
    group. A process that exits with the group still open may abort in gloo's teardown (SIGABRT,
    "terminate called without an active exception"), and the launcher then fails a finished training."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
