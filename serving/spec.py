"""What a server is: the typed, validated description of one OpenAI-compatible endpoint.

A run config embeds one `ServerSpec` per entry of its `servers:` section; serving/ needs nothing
else to start, health-check, stop or reach that server. Each field's description is the
documentation of that key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    """The base of every config section (lion_local's too): unknown keys are errors, and so are NaN and
    infinity in any float field."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class VllmOptions(StrictModel):
    """Settings passed to vLLM (see serving/commands.py for the flag or variable each one becomes)."""

    launcher: list[str] = Field(
        default_factory=lambda: ["vllm", "serve"],
        min_length=1,
        description="The command that runs vLLM's OpenAI server, before the flags lion-local adds: another "
        "environment's executable ([/opt/vllm-env/bin/vllm, serve]), its module "
        "([/opt/vllm-env/bin/python, -m, vllm.entrypoints.openai.api_server]) or a container prefix "
        "([apptainer, exec, --nv, vllm.sif, vllm, serve]). The first word is found on PATH unless it is a path.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model replica is split over.")
    data_parallel_size: int = Field(1, ge=1, description="Model replicas behind one server.")
    max_model_len: int | None = Field(None, ge=16, description="Context length; None: the model's own.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each GPU's memory vLLM takes.")
    dtype: str = Field("auto", description="Weights dtype: auto, bfloat16, float16 or float32.")
    enforce_eager: bool = Field(
        False, description="Skip torch.compile and graph capture: a faster start, slower serving (smoke mode)."
    )
    cpu_threads_bind: str | None = Field(
        None,
        description="vLLM's CPU backend only: the cores its OpenMP threads are bound to (VLLM_CPU_OMP_THREADS_BIND, "
        "e.g. '0' or '0-3'); two servers on one machine need disjoint sets. None: vLLM's own choice.",
    )
    cpu_kvcache_space_gib: int | None = Field(
        None, ge=1, description="vLLM's CPU backend only: GiB of memory for the KV cache (VLLM_CPU_KVCACHE_SPACE)."
    )
    cpu_worker_in_process: bool = Field(
        False,
        description="vLLM's CPU backend only: run the model in the engine's own process (--distributed-executor-backend "
        "uni with VLLM_ENABLE_V1_MULTIPROCESSING=0) rather than in a worker process of its own, which imports torch "
        "and vLLM once more: the tiny teacher starts in about 16 s instead of 24 s, with the same answers. One "
        "replica on one device only (tensor_parallel_size and data_parallel_size 1).",
    )
    extra_args: list[str] = Field(default_factory=list, description="More vLLM server arguments, verbatim.")

    @model_validator(mode="after")
    def _in_process_worker_is_one_device(self) -> VllmOptions:
        if self.cpu_worker_in_process and (self.tensor_parallel_size > 1 or self.data_parallel_size > 1):
            raise ValueError(
                "cpu_worker_in_process runs one replica on one device: set tensor_parallel_size and "
                "data_parallel_size to 1, or cpu_worker_in_process to false"
            )
        return self

    @field_validator("cpu_threads_bind", mode="before")
    @classmethod
    def _one_core_is_a_core_list(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class TransformersServeOptions(StrictModel):
    """Settings passed to `transformers serve` (the second CPU engine)."""

    device: str = Field("cpu", description="cpu, auto or cuda:N.")
    dtype: str = Field("auto", description="Weights dtype; auto follows the checkpoint.")
    extra_args: list[str] = Field(default_factory=list, description="More `transformers serve` arguments.")


class ServerSpec(StrictModel):
    """One OpenAI-compatible endpoint: a server lion-local starts, or one that already runs."""

    engine: Literal["vllm", "transformers", "external"] = Field(
        description="vllm (GPU, or CPU through vLLM's CPU build), transformers (`transformers serve`, CPU) "
        "or external (already running)."
    )
    model: str | None = Field(
        None,
        description="Local model directory (vllm and transformers engines). External: optional, a local copy of "
        "the served model; its tokenizer and chat template let `evaluate` measure the teacher's own NLL on the "
        "endpoint's prompt logprobs (vLLM) and `plan` count tokens.",
    )
    served_model_name: str | None = Field(
        None,
        description="Model name sent in requests. vllm: defaults to the model directory's name; "
        "external: required; transformers: always the model path.",
    )
    base_urls: list[str] = Field(
        default_factory=list,
        description="External engine: base URLs ending in /v1, balanced by the client. Empty: use the endpoints "
        "that `lion-local serve NAME --publish` (slurm/serve.sh) publishes in endpoint_dir.",
    )
    endpoint_dir: str | None = Field(
        None,
        description="External engine without base_urls: directory of published endpoint files; "
        "default <run_dir>/endpoints/<server name>.",
    )
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (keys never go in config)."
    )
    use_env_proxy: bool = Field(
        False, description="Send requests through the HTTP(S)_PROXY variables (a hosted API behind a proxy)."
    )
    host: str = Field(
        "127.0.0.1",
        description="Address a started server binds to. Beyond loopback (0.0.0.0, a host name or address) a vLLM "
        "server always requires an API key: api_key_env's, else a random key per start (a service job "
        "publishes it with its endpoint, readable by you only); `transformers serve` cannot require one.",
    )
    allow_open_server: bool = Field(
        False,
        description="Let a server lion-local starts bind beyond loopback with no API key, with a warning: anyone "
        "who can reach the node can then send it requests. Off: such a server requires a key, or is refused.",
    )
    port: int | None = Field(None, ge=1, le=65535, description="Port of a started server; None picks a free one.")
    startup_timeout_s: float = Field(900.0, gt=0, description="Longest wait for a started server's /health.")
    stop_grace_s: float | None = Field(
        None,
        gt=0,
        description="Wait after SIGTERM before a started server's processes are SIGKILLed. None: 20 s for vllm "
        "(its engine core and workers shut down after the API server), 10 s for transformers.",
    )
    keep_running_during_training: bool = Field(
        False,
        description="Leave this server up while the student trains. Off by default: on GPU machines training "
        "needs the GPUs a local server holds. A CPU-only server holds no GPU, so the smoke mode keeps its "
        "teacher up and saves a restart per iteration.",
    )
    max_concurrency: int = Field(64, ge=1, description="Requests in flight to this endpoint, over all base URLs.")
    request_timeout_s: float = Field(600.0, gt=0, description="Timeout of one HTTP attempt.")
    failure_budget_s: float = Field(
        300.0, gt=0, description="How long one request may keep failing (with retries) before the stage stops."
    )
    backoff_initial_s: float = Field(1.0, gt=0, description="First retry delay; doubles per attempt, with jitter.")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest retry delay.")
    vllm: VllmOptions = Field(default_factory=VllmOptions, description="Used when engine is vllm.")
    transformers: TransformersServeOptions = Field(
        default_factory=TransformersServeOptions, description="Used when engine is transformers."
    )

    @model_validator(mode="after")
    def _engine_needs(self) -> ServerSpec:
        if self.engine == "external":
            if self.base_urls and self.endpoint_dir:
                raise ValueError("give base_urls or endpoint_dir, not both")
            if self.base_urls and not self.served_model_name:
                raise ValueError("engine 'external' with base_urls needs served_model_name (the model name the endpoint serves)")
            for url in self.base_urls:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"base_urls entry {url!r} must start with http:// or https://")
        elif not self.model:
            raise ValueError(f"engine {self.engine!r} needs model: a local model directory")
        return self


_ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})


def port_clash(servers: dict[str, ServerSpec]) -> str | None:
    """"servers.<b>.port: ..." when two servers lion-local starts are configured with the same port on
    one address (a wildcard address takes the port on every address), else None."""
    started = [(name, spec) for name, spec in servers.items() if spec.engine != "external" and spec.port is not None]
    for index, (name, spec) in enumerate(started):
        for other, earlier in started[:index]:
            if earlier.port == spec.port and (earlier.host == spec.host or {earlier.host, spec.host} & _ANY_ADDRESS):
                return (
                    f"servers.{name}.port: {spec.port} is servers.{other}.port too (hosts {earlier.host} and "
                    f"{spec.host}); "
                    "give each server its own port, or leave port out to have a free one picked"
                )
    return None
