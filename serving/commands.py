"""Command lines and environments for the OpenAI-compatible servers lion-local starts.

vLLM flags are documented at https://docs.vllm.ai/en/latest/cli/serve.html (the serve command)
and https://docs.vllm.ai/en/latest/configuration/engine_args.html (engine arguments); its
environment variables at https://docs.vllm.ai/en/latest/configuration/env_vars.html.
`transformers serve` is documented at https://huggingface.co/docs/transformers/main/en/serving.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from serving.spec import ServerSpec


def executable(name: str) -> str:
    """The console script `name` installed next to this Python, else the one on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.exists():
        return str(sibling)
    return shutil.which(name) or name


def request_model_name(server: ServerSpec, model: str | None = None) -> str:
    """The `model` field requests must carry for this server."""
    if server.engine == "external":
        return str(server.served_model_name)
    if server.engine == "transformers":
        # transformers serve pins the model it preloads and rejects requests naming anything else.
        return str(model or server.model)
    return server.served_model_name or Path(str(model or server.model)).name


# vLLM accepts these values of --max-lora-rank only (engine_args.html#--max-lora-rank).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_adapter(model: str | None) -> dict | None:
    """The adapter_config.json of a PEFT LoRA adapter directory, or None for a full model."""
    path = Path(str(model)) / "adapter_config.json" if model else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _lora_args(adapter: dict, name: str, directory: str) -> list[str]:
    """Serve the adapter at `directory` on its base model, to requests naming `name`."""
    rank = next((r for r in VLLM_LORA_RANKS if r >= adapter["r"]), adapter["r"])
    # --enable-lora, --lora-modules NAME=PATH, --max-lora-rank (engine_args.html#--enable-lora).
    return ["--enable-lora", "--lora-modules", f"{name}={directory}", "--max-lora-rank", str(rank)]


def vllm_command(server: ServerSpec, host: str, port: int, model: str | None = None) -> list[str]:
    """The vLLM server of `server` (or of checkpoint `model`; a LoRA adapter is served on its base)."""
    options = server.vllm
    adapter = lora_adapter(model)
    name = request_model_name(server, model)
    launcher = list(options.launcher)
    if launcher == ["vllm", "serve"]:
        launcher[0] = executable("vllm")
    command = [
        *launcher,
        # --model rather than the positional model: `vllm serve` takes both, the api_server module only
        # this one (engine_args.html#--model).
        "--model",
        str(adapter["base_model_name_or_path"] if adapter else model or server.model),
        # --host/--port: address of the API server (cli/serve.html).
        "--host",
        host,
        "--port",
        str(port),
        # --served-model-name: the name clients send as `model` (engine_args.html#--served-model-name).
        "--served-model-name",
        f"{name}-base" if adapter else name,
        # --tensor-parallel-size: GPUs one replica is split over (engine_args.html#--tensor-parallel-size).
        "--tensor-parallel-size",
        str(options.tensor_parallel_size),
        # --data-parallel-size: replicas behind this one server (engine_args.html#--data-parallel-size).
        "--data-parallel-size",
        str(options.data_parallel_size),
        # --gpu-memory-utilization: share of each GPU taken (engine_args.html#--gpu-memory-utilization).
        "--gpu-memory-utilization",
        str(options.gpu_memory_utilization),
        # --dtype: weights dtype (engine_args.html#--dtype).
        "--dtype",
        options.dtype,
        # --generation-config vllm: ignore the checkpoint's generation_config.json so its sampling
        # defaults never override the role's request (engine_args.html#--generation-config).
        "--generation-config",
        "vllm",
    ]
    if options.enforce_eager:
        # --enforce-eager: no torch.compile or graph capture (engine_args.html#--enforce-eager).
        command.append("--enforce-eager")
    if options.max_model_len is not None:
        # --max-model-len: context length (engine_args.html#--max-model-len).
        command += ["--max-model-len", str(options.max_model_len)]
    if options.cpu_worker_in_process:
        # --distributed-executor-backend uni: the model runs in the engine process; vLLM's CPU
        # backend allows it only with VLLM_ENABLE_V1_MULTIPROCESSING=0 (server_environment).
        command += ["--distributed-executor-backend", "uni"]
    if adapter:
        command += _lora_args(adapter, name, str(model))
    return command + list(options.extra_args)


def transformers_command(server: ServerSpec, host: str, port: int, model: str | None = None) -> list[str]:
    options = server.transformers
    command = [
        executable("transformers"),
        "serve",
        str(model or server.model),  # preloaded and pinned: the only model this server answers for
        "--host",
        host,
        "--port",
        str(port),
        "--device",
        options.device,
        "--dtype",
        options.dtype,
        "--log-level",
        "info",
    ]
    return command + list(options.extra_args)


def server_command(server: ServerSpec, host: str, port: int, model: str | None = None) -> list[str]:
    if server.engine == "vllm":
        return vllm_command(server, host, port, model)
    if server.engine == "transformers":
        return transformers_command(server, host, port, model)
    raise ValueError(f"engine {server.engine!r} is not started by lion-local")


def server_environment(
    server: ServerSpec,
    api_key: str | None,
    vllm_internal_port: int | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """`base` (default: this process's environment), plus the API key where the server reads it
    (never the command line) and vLLM's own variables."""
    environment = dict(os.environ if base is None else base)
    if server.engine != "vllm":
        return environment
    options = server.vllm
    if api_key:
        # VLLM_API_KEY makes the server require this key, like --api-key, without putting the
        # key on a command line that `ps` shows (env_vars.html#VLLM_API_KEY).
        environment["VLLM_API_KEY"] = api_key
    if vllm_internal_port is not None:
        # VLLM_PORT: base of vLLM's internal ports; two servers on one node need distinct
        # ranges (env_vars.html#VLLM_PORT).
        environment["VLLM_PORT"] = str(vllm_internal_port)
    if options.cpu_threads_bind is not None:
        # VLLM_CPU_OMP_THREADS_BIND: cores of the CPU backend's OpenMP threads (env_vars.html).
        environment["VLLM_CPU_OMP_THREADS_BIND"] = options.cpu_threads_bind
    if options.cpu_worker_in_process:
        # VLLM_ENABLE_V1_MULTIPROCESSING=0: without it the CPU backend turns `uni` back into a worker
        # process (vllm/platforms/cpu.py); the API server keeps its engine process either way.
        environment["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if options.cpu_kvcache_space_gib is not None:
        # VLLM_CPU_KVCACHE_SPACE: GiB of KV cache on the CPU backend (env_vars.html).
        environment["VLLM_CPU_KVCACHE_SPACE"] = str(options.cpu_kvcache_space_gib)
    return environment


def launcher_problem(server: ServerSpec) -> str | None:
    """Why the server's command cannot run here (its program is not found), or None."""
    if server.engine == "vllm":
        program = server.vllm.launcher[0]
        if server.vllm.launcher == ["vllm", "serve"]:
            program = executable("vllm")
    elif server.engine == "transformers":
        program = executable("transformers")
    else:
        return None
    if shutil.which(program) is None:
        return f"{program} is not an executable file or a command on PATH"
    return None
