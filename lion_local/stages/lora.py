"""LoRA students (imitation.peft): a low-rank adapter trained through peft instead of full weights.

The base weights are always the configured student model's; the adapter of iteration k starts
from iteration k-1's (a fresh one in iteration 1), so the loop distils into one adapter. What
iter_<k>/student/ holds depends on imitation.peft.serve:
    adapter   the adapter itself (adapter_config.json, adapter_model.safetensors) and the
              tokenizer; vLLM serves it on the base model (serving.commands: --enable-lora)
    merged    the base with the adapter merged into full weights (served like any checkpoint),
              and the adapter in student/adapter/, from which the next iteration continues
The counting function is pure and imports nothing heavy: `lion-local plan` calls it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lion_local.run.sft_job import SftJob

logger = logging.getLogger(__name__)

MERGED_ADAPTER = "adapter"  # inside a merged student checkpoint


def adapter_of(student_dir: Path, serve: str) -> Path:
    """Where the adapter of a trained LoRA student lies."""
    return student_dir if serve == "adapter" else student_dir / MERGED_ADAPTER


# (input size, output size) of each LLaMA projection, from the model's config.json.
def _projection_shapes(model: dict) -> dict[str, tuple[int, int]]:
    hidden, heads = model["hidden_size"], model["num_attention_heads"]
    head_dim = model.get("head_dim") or hidden // heads
    kv = model.get("num_key_value_heads", heads) * head_dim
    intermediate = model["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden),
    }


def lora_parameter_count(model_dir: str | Path, rank: int, target_modules: list[str]) -> int | None:
    """Trainable parameters of a LoRA adapter on a LLaMA-architecture model: rank x (in + out) per
    targeted projection per layer; None when the model's config.json is not here or not LLaMA-shaped."""
    try:
        model = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        shapes = _projection_shapes(model)
        layers = model["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
    if any(name not in shapes for name in target_modules):
        return None
    return layers * sum(rank * (shapes[name][0] + shapes[name][1]) for name in target_modules)


# ----------------------------------------------------------------------------------------------
# In the training process (lion_local.stages.sft): peft is imported only there
# ----------------------------------------------------------------------------------------------


def model_to_train(job: SftJob, model_init_kwargs: dict):
    """(model, peft_config) for SFTTrainer: the base path with a new adapter's LoraConfig, or the
    base loaded with the previous iteration's adapter, trainable."""
    from peft import LoraConfig, PeftModel

    settings = job.imitation["peft"]
    if job.adapter_init is None:
        config = LoraConfig(
            r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
            target_modules=list(settings["target_modules"]), task_type="CAUSAL_LM",
        )
        return job.base_model, config
    from transformers import AutoModelForCausalLM

    logger.info("continuing the adapter of %s", job.adapter_init)
    base = AutoModelForCausalLM.from_pretrained(job.base_model, **model_init_kwargs)
    return PeftModel.from_pretrained(base, job.adapter_init, is_trainable=True), None


def save_student(model, output_dir: Path, serve: str) -> None:
    """Write the trained student as imitation.peft.serve says (see the module docstring)."""
    model.save_pretrained(adapter_of(output_dir, serve))
    if serve == "merged":
        model.merge_and_unload().save_pretrained(output_dir)
