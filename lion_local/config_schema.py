"""The run configuration's schema: every section and field, typed, documented and strict.

lion_local.config reads the YAML files into `Config`; each field's description is the
documentation of that key, and the unknown-key hints list the fields defined here.
"""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, model_validator

from lion_local.config_stages import (  # noqa: F401  (the stage sections, imported from here by lion_local.config)
    Decontamination, Discrimination, Evaluation, Generation, GenerationFilters, Imitation, Lora, RefereeCheck,
    TinyModels,
)
from lion_local.trainer_settings import SEED_MAX
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

    def servers_in_use(self) -> list[str]:
        """The names of the servers some role talks to."""
        return sorted({getattr(self.roles, role).server for role in Roles.model_fields})
