"""The run configuration's schema: every section and field, typed, documented and strict.

lion_local.config reads the YAML files into `Config`; each field's description is the
documentation of that key, and the unknown-key hints list the fields defined here.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails

from lion_local.run.layout import RunDir
from lion_local.trainer_settings import MOVED_IMITATION_KEYS, SEED_MAX, trainer_problem, PAPER_TRAINER
from serving.spec import ServerSpec, TransformersServeOptions, VllmOptions, port_clash
from serving.spec import StrictModel as _Strict  # unknown keys, NaN and infinity are errors in every section

MAX_SEEDS = 10_000_000  # seed instructions a run (or `lion-local plan --seeds`) may plan for


# ----------------------------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------------------------


class _RoleBase(_Strict):
    server: str = Field(description="Name of the entry in `servers` this role talks to.")
    temperature: float = Field(ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(ge=1, description="Most tokens generated per request.")
    warn_truncated_share: float = Field(0.1, ge=0, le=1, description="Warn when more of the role's replies in a "
                                        "stage were cut at the length limit (teacher, generator; the others: counted).")

    def request_params(self, seed: int | None = None, max_tokens: int | None = None) -> dict:
        """The sampling fields of one request; `seed` only when given (not every server takes it)."""
        params = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": max_tokens or self.max_tokens}
        if seed is not None:
            params["seed"] = seed
        return params


class TeacherRole(_RoleBase):
    """The teacher answers instructions (chat completions)."""

    server: str = "teacher"
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(1024, ge=1)
    system_prompt: str | None = Field(None, description="Optional system message before each instruction.")


class RefereeRole(_RoleBase):
    """The referee scores a teacher/student answer pair (chat completions)."""

    server: str = "teacher"
    temperature: float = Field(0.2, ge=0, le=2)
    max_tokens: int = Field(
        512, ge=1, description="Most tokens of an explain_first review; the two short modes need only a few."
    )
    mode: Literal["explain_first", "scores_only", "expected_score"] = Field(
        "explain_first",
        description="explain_first: the paper's review, an explanation then the two scores; scores_only: the reply "
        "is constrained to the two scores; expected_score: as scores_only, each score the probability-weighted mean "
        "of the score tokens (needs top_logprobs). The short modes need structured outputs: vLLM or a hosted API.",
    )
    structured_output: Literal["regex", "json_schema"] = Field(
        "regex",
        description="How the short modes constrain the reply: regex (vLLM's `structured_outputs`, the form vLLM "
        "follows best) or json_schema (`response_format`, the form hosted OpenAI-compatible APIs take).",
    )
    parse_retries: int = Field(
        3, ge=0, description="Extra requests when a review cannot be parsed; then the instruction is unjudged."
    )
    system_prompt: str | None = Field(
        None, description="System message of each review; None: the paper's judge prompt (lion_local/roles/referee.py)."
    )


class GeneratorRole(_RoleBase):
    """The generator writes a new instruction from a hard or an easy seed (chat completions)."""

    server: str = "teacher"
    temperature: float = Field(1.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1, description="Upper bound on the length budget below.")
    length_budget_factor: float = Field(
        4.0, gt=0, description="Token budget per new instruction = this x the seed's word count (at least 16)."
    )


class StudentRole(_RoleBase):
    """The student answers instructions; it is served from its own checkpoints."""

    server: str = "student"
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(1024, ge=1)
    prompt_format: Literal["alpaca", "chat"] = Field(
        "alpaca",
        description="alpaca: Alpaca-style prompt through /v1/completions (base models); "
        "chat: the checkpoint's chat template through /v1/chat/completions.",
    )


class Roles(_Strict):
    teacher: TeacherRole = Field(default_factory=TeacherRole)
    referee: RefereeRole = Field(default_factory=RefereeRole)
    generator: GeneratorRole = Field(default_factory=GeneratorRole)
    student: StudentRole = Field(default_factory=StudentRole)


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
    tau: float = Field(1.0, description="An instruction is hard when teacher_score - student_score >= tau.")
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


# ----------------------------------------------------------------------------------------------
# The whole config
# ----------------------------------------------------------------------------------------------


class Config(_Strict):
    run_dir: str = Field(min_length=1, description="Directory holding everything the run writes.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of every random choice the run makes.")
    iterations: int = Field(3, ge=1, le=1000, description="Imitation-discrimination-generation iterations.")
    seed_data: str = Field(min_length=1, description="Seed instructions: JSON list or JSONL with instruction and optional input.")
    seed_limit: int | None = Field(None, ge=1, le=MAX_SEEDS, description="Use only the first N seed instructions.")
    tiny_models: TinyModels | None = Field(None, description="Smoke mode: build tiny local models when absent.")
    servers: dict[str, ServerSpec] = Field(description="Endpoints by name; roles refer to them.")
    roles: Roles = Field(default_factory=Roles)
    imitation: Imitation = Field(default_factory=Imitation)
    discrimination: Discrimination = Field(default_factory=Discrimination)
    generation: Generation = Field(default_factory=Generation)
    evaluation: Evaluation = Field(default_factory=Evaluation)

    @model_validator(mode="after")
    def _judge_names_a_server(self) -> Config:
        judge = self.evaluation.judge_server
        if judge is not None and judge not in self.servers:
            raise ValueError(f"evaluation.judge_server: no server named {judge!r}{self._server_hint(judge)}")
        if judge is not None and judge == self.roles.student.server:
            raise ValueError(
                f"evaluation.judge_server: {judge!r} serves the student's checkpoints; name the server of the judge model"
            )
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> Config:
        clash = port_clash(self.servers)
        if clash is not None:
            raise ValueError(clash)
        return self

    @model_validator(mode="after")
    def _roles_name_servers(self) -> Config:
        for role_name in Roles.model_fields:
            role = getattr(self.roles, role_name)
            if role.server not in self.servers:
                hint = self._server_hint(role.server)
                raise ValueError(f"roles.{role_name}.server: no server named {role.server!r}{hint}")
        referee_engine = self.servers[self.roles.referee.server].engine
        if self.roles.referee.mode != "explain_first" and referee_engine == "transformers":
            raise ValueError(
                f"roles.referee.mode: {self.roles.referee.mode} needs structured outputs"
                + (" and logprobs" if self.roles.referee.mode == "expected_score" else "")
                + f", which `transformers serve` (servers.{self.roles.referee.server}) rejects; serve the referee "
                "with vllm or use mode explain_first"
            )
        peft = self.imitation.peft
        if peft is not None and peft.serve == "adapter" and self.servers[self.roles.student.server].engine != "vllm":
            raise ValueError(
                f"imitation.peft.serve: adapter checkpoints are served by vLLM (--enable-lora), but "
                f"servers.{self.roles.student.server} is not a vllm server; use serve: merged"
            )
        if self.servers[self.roles.student.server].engine == "external":
            raise ValueError(
                f"servers.{self.roles.student.server}.engine: the student is served from its own checkpoints, "
                "so its engine must be vllm or transformers"
            )
        shared = [r for r in ("teacher", "referee", "generator") if getattr(self.roles, r).server == self.roles.student.server]
        if shared:
            raise ValueError(
                f"roles.student.server: {self.roles.student.server!r} also serves the {', '.join(shared)}; the student "
                "server is restarted with each new checkpoint, so give the student a server of its own"
            )
        return self

    def _server_hint(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.servers), n=1)
        return f" (did you mean {close[0]!r}?)" if close else f" (defined: {', '.join(sorted(self.servers))})"

    def server_for(self, role: str) -> ServerSpec:
        return self.servers[getattr(self.roles, role).server]

    def endpoint_dir(self, name: str) -> Path:
        """Where endpoints of server `name` are published by `lion-local serve NAME --publish`."""
        configured = self.servers[name].endpoint_dir
        return Path(configured) if configured else RunDir(self.run_dir).endpoints(name)

    def servers_in_use(self) -> list[str]:
        """The names of the servers some role talks to."""
        return sorted({getattr(self.roles, role).server for role in Roles.model_fields})
