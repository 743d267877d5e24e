"""The run configuration's stage sections: imitation, discrimination, generation, evaluation and
the smoke models, each typed, documented and strict (lion_local.config_schema puts them together).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

from lion_local.trainer_settings import MOVED_IMITATION_KEYS, SEED_MAX, trainer_problem, PAPER_TRAINER
from serving.spec import StrictModel as _Strict  # unknown keys, NaN and infinity are errors in every section

# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def _key_error(title: str, key: str, value: Any, message: str) -> ValidationError:
    """A validation error located at `key` inside the field being validated (the one-line errors name it)."""
    detail = InitErrorDetails(type="value_error", loc=(key,), input=value, ctx={"error": ValueError(message)})
    return ValidationError.from_exception_data(title, [detail])


class Lora(_Strict):
    """A LoRA student: peft trains a low-rank adapter on the configured student's frozen weights."""

    rank: int = Field(16, ge=1, description="The adapter's rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Module names that get an adapter (LLaMA: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
        "down_proj).",
    )
    serve: Literal["merged", "adapter"] = Field(
        "merged",
        description="merged: each checkpoint is the base with the adapter merged in (full weights; the adapter "
        "beside it in student/adapter/); adapter: the checkpoint is the adapter, which vLLM serves on the base "
        "model (--enable-lora).",
    )


class Imitation(_Strict):
    """Student fine-tuning with TRL's SFTTrainer (defaults: the paper's settings)."""

    trainer: dict[str, Any] = Field(
        default_factory=lambda: dict(PAPER_TRAINER),
        description="trl.SFTConfig keyword arguments, passed through unchanged (bf16 only on a GPU). Keys given "
        "here replace the paper's value of that key; the others keep it: " + ", ".join(
            f"{key}={value}" for key, value in PAPER_TRAINER.items()
        ) + ". Keys lion-local sets itself (output_dir, seed, gradient_accumulation_steps, ...) are refused.",
    )
    effective_batch_size: int = Field(
        128,
        ge=1,
        description="Examples per optimizer step over all processes: gradient_accumulation_steps = this / "
        "(trainer.per_device_train_batch_size x processes), rounded up.",
    )
    accelerate_config: str | None = Field(
        None, min_length=1, description="accelerate config file (configs/accelerate/*.yaml); None: one process."
    )
    peft: Lora | None = Field(
        None, description="Train a LoRA adapter instead of full weights (None: full weights, the paper's way)."
    )
    final_imitation: bool = Field(True, description="After the last iteration, train on the last Train Pool.")
    drop_truncated_answers: bool = Field(
        False,
        description="Leave teacher answers cut at roles.teacher.max_tokens out of training (counted in imitation.json "
        "as dropped_truncated_answers). false: train on them as they are, as the paper did; the student then also "
        "learns to stop where the cut fell.",
    )
    rendezvous_port: int = Field(
        29500, ge=1, le=65535, description="Multi-node training: c10d rendezvous port on the job's first node."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        for key in data if isinstance(data, dict) else ():
            if key in MOVED_IMITATION_KEYS:
                moved = MOVED_IMITATION_KEYS[key]
                raise _key_error(cls.__name__, key, data[key], f"now imitation.trainer.{moved} (trl's SFTConfig field)")
        return data

    @field_validator("trainer", mode="after")
    @classmethod
    def _sft_config_keys(cls, trainer: dict[str, Any]) -> dict[str, Any]:
        found = trainer_problem(trainer)
        if found is not None:
            key, problem = found
            raise _key_error(cls.__name__, key, trainer[key], problem)
        return {**PAPER_TRAINER, **trainer}


class RefereeCheck(_Strict):
    """When a discrimination stops because the referee's judgement is worthless
    (lion_local/stages/referee_health.py). Operational: none of these changes a judgement."""

    control_pairs: int = Field(16, ge=0, description="Control pairs reviewed first in each discrimination: the "
                               "teacher's answer against an empty, a cut or another instruction's answer (the better "
                               "side known); never in a pool. 0: none (only the Cache Pool's unjudged share counts).")
    min_control_accuracy: float = Field(0.75, ge=0, le=1, description="Stop when the referee prefers the teacher's "
                                        "answer in a smaller share of the judged control pairs (a coin: 0.5).")
    max_unjudged_share: float = Field(0.2, ge=0, le=1, description="Stop when a larger share of the control pairs, "
                                      "or of the Cache Pool once reviewed, has no readable review in an order.")


class Discrimination(_Strict):
    signal: Literal["referee", "likelihood", "none"] = Field(
        "referee",
        description="How hard instructions are found (docs/method.md). referee: the paper's, the referee reviews "
        "each teacher/student answer pair; likelihood: an instruction's gap is the student's mean NLL per token of "
        "the teacher's answer (one prefill on the student's server, no student answer, no referee call), hard above "
        "the likelihood_quantile of the Cache Pool's gaps; none: no discrimination, the generator draws its seeds "
        "uniformly from the whole Cache Pool (the imitation-with-generation baseline).",
    )
    tau: float = Field(1.0, description="signal referee: an instruction is hard when teacher_score - student_score >= tau.")
    likelihood_quantile: float = Field(
        0.5, gt=0, lt=1, description="signal likelihood: an instruction is hard when its gap is above this quantile "
        "of the Cache Pool's gaps (0.5: the upper half is hard, whatever the gaps' scale).",
    )
    referee_check: RefereeCheck = Field(default_factory=RefereeCheck)
    stream_reviews: bool = Field(
        True,
        description="Send an instruction's reviews as soon as its student answer is in, and stop the student's "
        "server after its last answer (on GPU it frees the student's GPUs early). false: every student answer "
        "first, then the reviews (for servers that share the same CPU cores and slow each other down).",
    )


class GenerationFilters(_Strict):
    """Post-filters applied to each generated instruction before the novelty check."""

    banned_words: list[str] = Field(
        default_factory=lambda: ["instruction"], description="Drop instructions containing any of these words."
    )
    min_words: int = Field(4, ge=1, description="Drop instructions with fewer words.")
    drop_leading_punctuation: bool = Field(True, description="Drop instructions starting with punctuation.")
    drop_non_ascii_start: bool = Field(False, description="Drop instructions starting with a non-ASCII character.")
    drop_truncated: bool = Field(True, description="Drop instructions cut off by the length budget.")


class Decontamination(_Strict):
    """Rejects a generated instruction too close to an evaluation question (reason `contaminated`)."""

    enabled: bool = Field(
        True,
        description="Check every generated instruction against the evaluation questions below, after the "
        "post-filters and before the novelty check; false: no check.",
    )
    include_builtin_questions: bool = Field(
        True, description="Check against the built-in question set (lion_local/data/eval_questions.jsonl)."
    )
    question_files: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="More question files to check against, JSONL of {question, category?, id?} as for "
        "evaluation.questions (e.g. the file evaluation.questions names).",
    )
    rouge_threshold: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Reject an instruction whose ROUGE-L F against some question is above this (kept if <= this, "
        "as generation.rouge_threshold).",
    )
    ngram: int = Field(
        13,
        ge=1,
        description="Reject an instruction sharing any run of this many words (lowercased, punctuation ignored) "
        "with some question; an instruction shorter than this is checked by ROUGE-L only.",
    )


class Generation(_Strict):
    new_per_iteration: int = Field(6000, ge=1, le=1_000_000, description="New instructions wanted per iteration (N).")
    hard_ratio: float = Field(0.5, ge=0, le=1, description="Share of N generated from hard seeds.")
    rouge_threshold: float = Field(
        0.7, gt=0, le=1, description="Keep a new instruction only if its ROUGE-L F against the Cache Pool is <= this."
    )
    max_attempts_factor: float = Field(
        4.0, ge=1, le=1000, description="Stop after this x N generator calls, recording the shortfall."
    )
    expected_acceptance: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Share of generator replies expected to pass the filters, the decontamination and the "
        "novelty check: sizes each iteration's first wave of generator calls, and `lion-local plan` assumes "
        "it until a generation stage of the run has finished.",
    )
    filters: GenerationFilters = Field(default_factory=GenerationFilters)
    decontamination: Decontamination = Field(default_factory=Decontamination)


class Evaluation(_Strict):
    """`lion-local evaluate`: the paper's relative score of each student checkpoint against the teacher."""

    judge_server: str | None = Field(
        None,
        description="Server whose model judges each answer pair, with the referee's prompt and sampling "
        "parameters; None: the referee's server.",
    )
    questions: str | None = Field(
        None,
        min_length=1,
        description="Evaluation questions, JSONL of {question, category?, id?}; None: the built-in set "
        "(lion_local/data/eval_questions.jsonl).",
    )
    parse_retries: int | None = Field(
        None, ge=0, description="Extra requests when a judgement cannot be parsed; None: roles.referee.parse_retries."
    )
    likelihood: bool = Field(True, description="Measure each checkpoint's NLL of the teacher's answers, the "
                             "initial student's too (on vLLM one prefill per answer). false: the relative score only.")
    held_out_seeds: int = Field(32, ge=0, description="Seed instructions after the first seed_limit of seed_data "
                                "(never in a pool) whose teacher answers' NLL is measured too (none without seed_limit).")


class TinyModels(_Strict):
    """Smoke mode: tiny local models built by `lion-local make-tiny` when absent."""

    dir: str = Field("models/tiny", min_length=1, description="Holds teacher/ and student/; built here on first use.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the tiny models' weights and training.")
