"""Stage 1, imitation: teacher answers for the Train Pool, then fine-tune the student on them.

    lion-local stage imitation --config X

Teacher answers come through the run-wide cache (only missing ones are requested). Training
runs in a separate process, `lion_local.stages.sft` (under `accelerate launch` with an accelerate
file, one srun task per node when the SLURM job spans several; see training_launch.py),
continuing from the previous student checkpoint (the configured base model in iteration 1), with
the loss on the answer only.
The checkpoint is written to iter_<k>/student.partial/ and renamed to iter_<k>/student/ only
after training exited cleanly, so a half-written checkpoint is never taken for a finished one.
The final imitation (iteration FINAL) trains on the last iteration's generated instructions into
final/student/.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from lion_local.errors import LionError
from lion_local.config import Config
from lion_local.endpoints.journaled import progress_bar
from lion_local.offline import offline_environ
from lion_local.run.records import pools_for
from lion_local.roles.student import student_chat_messages, student_training_text
from lion_local.run.layout import Iteration, IterationDir, RunDir, is_adapter, is_checkpoint
from lion_local.run.record_types import ImitationSummary, InstructionRecord, TeacherAnswer, TrainingExample, TrainingResult
from lion_local.run.state import write_atomic, write_jsonl_atomic
from lion_local.stages.teacher_answers import teacher_answers_for
from lion_local.stages.lora import adapter_of
from lion_local.stages.training_launch import training_command, training_environment
from lion_local.stages.truncation import warn_truncated
from lion_local.endpoints.servers import ServerSet
from serving.process import die_with_parent

logger = logging.getLogger(__name__)


class TrainingError(LionError):
    """Student training failed; the message names the exit code and the log."""


def base_checkpoint(config: Config, run: RunDir, iteration: Iteration) -> str:
    """The checkpoint an iteration's imitation continues from (a LoRA student: always the
    configured model; its adapter continues, see `adapter_init`)."""
    previous = _previous_student(config, run, iteration)
    if previous is None or config.imitation.peft is not None:
        return str(config.server_for("student").model)
    return str(previous)


def adapter_init(config: Config, run: RunDir, iteration: Iteration) -> str | None:
    """The adapter a LoRA student's training starts from: the previous iteration's (None: a new one)."""
    previous = _previous_student(config, run, iteration)
    if config.imitation.peft is None or previous is None:
        return None
    adapter = adapter_of(previous, config.imitation.peft.serve)
    return str(adapter) if is_adapter(adapter) else None  # a copied full checkpoint holds none


def _previous_student(config: Config, run: RunDir, iteration: Iteration) -> Path | None:
    if iteration.number == 1:
        return None
    return run.iteration(config.iterations if iteration.is_final else iteration.number - 1).student


def training_examples(
    config: Config, records: list[InstructionRecord], answers: dict[str, TeacherAnswer], eos_token: str
) -> list[TrainingExample]:
    """Prompt/completion rows for SFTTrainer, built with the student's one prompt format."""
    examples = []
    for record in records:
        answer = answers[record["id"]]
        if answer["empty"] or (config.imitation.drop_truncated_answers and answer["finish_reason"] == "length"):
            continue  # nothing to imitate, or cut short and left out; counted in the stage summary
        if config.roles.student.prompt_format == "chat":
            prompt = student_chat_messages(record["instruction"], record["input"])
            examples.append({"id": record["id"], "prompt": prompt, "completion": [
                {"role": "assistant", "content": answer["answer"]}
            ]})
        else:
            prompt, completion = student_training_text(record["instruction"], record["input"], answer["answer"], eos_token)
            examples.append({"id": record["id"], "prompt": prompt, "completion": completion})
    return examples


async def run_imitation(config: Config, run: RunDir, iteration: Iteration, servers: ServerSet) -> ImitationSummary:
    """Run (or finish) an iteration's imitation and return its summary; the caller marks the stage done."""
    marker = iteration.stage("imitation")
    directory = run.at(iteration)
    train_pool, _ = pools_for(config, run, iteration)

    answers = await teacher_answers_for(config, run, train_pool, servers, marker)
    # Training needs the GPUs a local teacher holds (unless its config keeps it up: a CPU-only
    # server holds none); the next stage starts what was stopped again.
    await servers.stop_for_training()

    student_dir = directory.student
    base = base_checkpoint(config, run, iteration)
    truncated = warn_truncated(str(marker), "teacher", list(answers.values()), config.roles.teacher.warn_truncated_share,
                               "roles.teacher.max_tokens")
    dropped = sum(1 for a in answers.values() if not a["empty"] and a["finish_reason"] == "length")
    summary = {
        "train_pool": len(train_pool),
        "empty_teacher_answers": sum(1 for a in answers.values() if a["empty"]),
        "truncated_teacher_answers": truncated,
        "dropped_truncated_answers": dropped if config.imitation.drop_truncated_answers else 0,
        "base_checkpoint": base,
    }
    if is_checkpoint(student_dir):
        logger.info("%s: %s already holds the trained student", marker, student_dir)
    else:
        from transformers import AutoTokenizer

        eos_token = (await asyncio.to_thread(AutoTokenizer.from_pretrained, base)).eos_token or ""
        examples = training_examples(config, train_pool, answers, eos_token)
        summary["examples"] = len(examples)
        if not examples:
            logger.warning("%s: no training examples (empty Train Pool or answers); the student is unchanged", marker)
            await asyncio.to_thread(_copy_checkpoint, _previous_student(config, run, iteration) or Path(base), student_dir)
            summary["training"] = {"skipped": "no training examples; the checkpoint is a copy of the base"}
        else:
            summary["training"] = await train_student(config, run, directory, base, examples)
    summary.setdefault("examples", len(train_pool) - summary["empty_teacher_answers"] - summary["dropped_truncated_answers"])
    write_atomic(directory.imitation_summary, json.dumps(summary, indent=2) + "\n")
    return summary


async def train_student(
    config: Config, run: RunDir, directory: IterationDir, base: str, examples: list[TrainingExample]
) -> TrainingResult:
    """Fine-tune `base` on `examples` in a training process of its own, followed from the event
    loop (an asyncio subprocess: a signal stops it at once); return its summary."""
    marker = directory.iteration.stage("imitation")
    student_dir, partial_dir, work_dir = directory.student, directory.student_partial, directory.sft_checkpoints
    log_path, data_file, job_file = directory.sft_log, directory.sft_data, directory.sft_job
    progress_file, result_file = directory.sft_progress, directory.sft_result

    write_jsonl_atomic(data_file, examples)
    from lion_local.run.sft_job import SftJob  # the job type the training process reads back

    SftJob(
        base_model=base,
        data_file=str(data_file),
        output_dir=str(partial_dir),
        work_dir=str(work_dir),
        progress_file=str(progress_file),
        result_file=str(result_file),
        tensorboard_dir=str(run.tensorboard(directory.iteration)),
        seed=config.seed + (directory.iteration.number or 0),
        adapter_init=adapter_init(config, run, directory.iteration),
        imitation=config.imitation.model_dump(mode="json"),
    ).write(job_file)
    result_file.unlink(missing_ok=True)
    if partial_dir.exists():
        shutil.rmtree(partial_dir)

    command = training_command(config, job_file)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%s: training the student on %d examples from %s; log: %s", marker, len(examples), base, log_path)
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=offline_environ(**training_environment(config)),
            preexec_fn=die_with_parent,
        )
        await _follow_progress(process, progress_file, f"{marker}: training")
    if process.returncode != 0:
        raise TrainingError(
            f"{marker}: student training exited with code {process.returncode}; "
            f"last log lines: {_tail(log_path)!r}; full log: {log_path}"
        )
    if not is_checkpoint(partial_dir):
        raise TrainingError(f"{marker}: training finished but wrote no safetensors checkpoint to {partial_dir}")
    os.replace(partial_dir, student_dir)
    shutil.rmtree(work_dir, ignore_errors=True)  # optimizer states are large and no longer needed
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result["wall_s"] = round(time.monotonic() - started, 2)
    return result


async def _follow_progress(process: asyncio.subprocess.Process, progress_file: Path, description: str) -> None:
    bar = None
    try:
        while not await _exited_within(process, 1.0):
            try:
                progress = json.loads(progress_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if bar is None and progress.get("max_steps"):
                bar = progress_bar(progress["max_steps"], description, unit="step", initial=progress["step"])
            elif bar is not None:
                bar.n = progress["step"]
                if progress.get("loss") is not None:
                    bar.set_postfix(loss=f"{progress['loss']:.3f}", refresh=False)
                bar.refresh()
    except BaseException:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        raise
    finally:
        if bar is not None:
            bar.close()


async def _exited_within(process: asyncio.subprocess.Process, seconds: float) -> bool:
    """Wait up to `seconds`; True as soon as the process has exited, not at the end of the wait."""
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True


def _copy_checkpoint(source: Path, destination: Path) -> None:
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    os.replace(partial, destination)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])
