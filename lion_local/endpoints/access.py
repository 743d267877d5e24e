"""The rules for a config's servers that need more than the config: their API keys, whether their
launchers and model directories are there, and where their endpoints are published.

Each check fails with a one-line ConfigError naming the key to fix, before anything starts;
serving/access.py decides which key a server requires, and these functions ask it with the
config's values.
"""

from __future__ import annotations

import os
from pathlib import Path

from lion_local.config import Config, ConfigError
from lion_local.input_files import InputKind, parse_json, read_text
from lion_local.run.layout import RunDir
from serving.access import StartedFor, key_rule, server_key
from serving.commands import launcher_problem
from serving.process import ServerError

MODEL_CONFIG = InputKind("model config", "", 16 << 20, ConfigError)
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model*.bin.index.json")


def endpoint_dir(config: Config, name: str) -> Path:
    """Where endpoints of server `name` are published by `lion-local serve NAME --publish`."""
    configured = config.servers[name].endpoint_dir
    return Path(configured) if configured else RunDir(config.run_dir).endpoints(name)


def check_models_exist(config: Config, server_names: list[str]) -> None:
    """Fail with exit-2 style errors when a model directory a command needs is missing, or holds no
    loadable model (config.json with a model_type, and weights).

    Directories under `tiny_models.dir` are allowed to be absent: they are built on first use.
    """
    tiny_dir = Path(config.tiny_models.dir) if config.tiny_models else None
    for name in server_names:
        server = config.servers[name]
        if server.model is None:
            continue
        model = Path(server.model)
        if model.is_dir():
            problem = _model_problem(model)
        elif tiny_dir is not None and model.parent == tiny_dir:
            continue
        else:
            problem = f"{model} {'is a file, not a model directory' if model.exists() else 'does not exist'}"
        if problem is not None:
            raise ConfigError(
                f"servers.{name}.model: {problem}; set it to a local model directory (nothing is downloaded), "
                f"e.g. --set servers.{name}.model=/path/to/model"
            )


def _model_problem(model: Path) -> str | None:
    """Why the directory `model` holds no model a server could load, or None."""
    config_json = model / "config.json"
    try:
        data = parse_json(read_text(config_json, MODEL_CONFIG), config_json, ConfigError)
    except ConfigError as exc:
        return str(exc)
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str) or not data["model_type"]:
        return f"{config_json}: no model_type (not a transformers model config)"
    if not any(any(model.glob(pattern)) for pattern in WEIGHT_FILES):
        return f"{model} holds no weights ({', '.join(WEIGHT_FILES[:2])}, or their index)"
    return None


def check_launchers(config: Config, server_names: list[str]) -> None:
    """Fail with an exit-2 style error when a server's command is not found, before anything starts."""
    for name in server_names:
        problem = launcher_problem(config.servers[name])
        if problem is not None:
            key = "vllm.launcher" if config.servers[name].engine == "vllm" else "engine"
            hint = (
                "install vLLM there (`make install` creates .venv-vllm/ on CPU machines) or point the key at "
                "your vLLM environment or container"
                if key == "vllm.launcher"
                else "install transformers[serving] (the serve extra)"
            )
            raise ConfigError(f"servers.{name}.{key}: {problem}; {hint}")


def api_key_for(config: Config, server_name: str) -> str | None:
    """The API key of a server from its environment variable; an unset variable is a config error."""
    variable = config.servers[server_name].api_key_env
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(
            f"servers.{server_name}.api_key_env: environment variable {variable} is not set; "
            f"export {variable}=<key> before running"
        )
    return value


def check_access(config: Config, server_name: str, started_for: StartedFor = "run") -> None:
    """Fail before anything starts when the server's key variable is unset, or when the server may not
    start as configured (beyond loopback with no key it can require: serving/access.py)."""
    try:
        key_rule(server_name, config.servers[server_name], api_key_for(config, server_name) is not None, started_for)
    except ServerError as exc:
        raise ConfigError(str(exc)) from None


def server_key_for(config: Config, server_name: str, started_for: StartedFor = "run") -> str | None:
    """The key the server requires when lion-local starts (or reaches) it: the configured one, a new
    random one (serving/access.py says when), or None."""
    try:
        return server_key(server_name, config.servers[server_name], api_key_for(config, server_name), started_for)
    except ServerError as exc:
        raise ConfigError(str(exc)) from None
