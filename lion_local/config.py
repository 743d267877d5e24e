"""The run configuration: YAML files with `include:` and `--set` overrides, validated strictly.

Every command loads its config through `load_config`, which either returns a fully validated
`Config` or raises `ConfigError` with one line naming the file and the key path. Nothing is
written anywhere before that succeeds.

Relative paths in a config (run_dir, seed_data, model directories, ...) are relative to the
directory the command runs in (the project root in the documented commands); `include:` paths
are relative to the file that includes them.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from lion_local.errors import InputError
from lion_local.input_files import InputKind, parse_yaml, read_text
from lion_local.config_schema import (
    Config,
    Discrimination,
    Evaluation,
    Generation,
    GenerationFilters,
    GeneratorRole,
    Imitation,
    RefereeCheck,
    RefereeRole,
    Roles,
    ServerSpec,
    StudentRole,
    TeacherRole,
    TinyModels,
    TransformersServeOptions,
    VllmOptions,
)

# The schema's names are imported from here throughout the project, next to load_config.
__all__ = [
    "Config", "ConfigError", "Discrimination", "Evaluation", "Generation", "GenerationFilters", "GeneratorRole",
    "Imitation", "RefereeCheck", "RefereeRole", "Roles", "ServerSpec", "StudentRole", "TeacherRole", "TinyModels",
    "TransformersServeOptions", "VllmOptions", "check_accelerate_config", "config_to_yaml", "load_config",
]

class ConfigError(InputError):
    """A bad config or a bad path named by it; the message is one line saying where and how to fix it."""


CONFIG_FILE = InputKind("config file", "", 16 << 20, ConfigError)
ACCELERATE_CONFIG = InputKind("accelerate config file", "", 1 << 20, ConfigError)
# A model directory's weights: safetensors or PyTorch files, single or sharded (with an index).


PATH_FIELDS = ("run_dir", "seed_data", "tiny_models.dir", "imitation.accelerate_config", "evaluation.questions")
PATH_LIST_FIELDS = ("generation.decontamination.question_files",)


# ----------------------------------------------------------------------------------------------
# Loading: YAML, include, --set, validation with one-line errors
# ----------------------------------------------------------------------------------------------

KeyPath = tuple[str, ...]


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, merge and validate a config; raise ConfigError (one line) on any problem."""
    data, origins = _read_with_includes(Path(path), stack=())
    for override in overrides:
        _apply_override(data, origins, override)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, origins, Path(path))) from None
    _resolve_paths(config)
    return config


def _read_yaml(path: Path, included_from: Path | None) -> dict:
    where = f" (included from {included_from})" if included_from else ""
    data = parse_yaml(read_text(path, CONFIG_FILE, where), str(path), ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, not {type(data).__name__}")
    return data


def _read_with_includes(path: Path, stack: tuple[Path, ...]) -> tuple[dict, dict[KeyPath, str]]:
    data = _read_yaml(path, stack[-1] if stack else None)  # first: it names a symlink loop, resolve() would not
    resolved = path.resolve()
    if resolved in stack:
        cycle = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(f"{path}: include cycle: {cycle}")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(item, str) for item in includes):
        raise ConfigError(f"{path}: include: must be a file path or a list of file paths")

    merged: dict = {}
    origins: dict[KeyPath, str] = {}
    for item in includes:
        child, child_origins = _read_with_includes(path.parent / item, (*stack, resolved))
        _deep_merge(merged, child, origins, child_origins)
    _deep_merge(merged, data, origins, _origins_of(data, str(path)))
    return merged, origins


def _origins_of(data: dict, source: str, prefix: KeyPath = ()) -> dict[KeyPath, str]:
    origins: dict[KeyPath, str] = {}
    for key, value in data.items():
        origins[(*prefix, str(key))] = source
        if isinstance(value, dict):
            origins.update(_origins_of(value, source, (*prefix, str(key))))
    return origins


def _deep_merge(base: dict, incoming: dict, origins: dict, incoming_origins: dict, prefix: KeyPath = ()) -> None:
    """Mappings merge key by key; anything else (lists included) is replaced by the later file."""
    for key, value in incoming.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            origins[path] = incoming_origins.get(path, origins.get(path, "?"))
            _deep_merge(base[key], value, origins, incoming_origins, path)
        else:
            base[key] = value
            for stale in [p for p in origins if p[: len(path)] == path]:
                del origins[stale]
            origins.update({p: s for p, s in incoming_origins.items() if p[: len(path)] == path})


def _apply_override(data: dict, origins: dict[KeyPath, str], override: str) -> None:
    key, sep, raw_value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set generation.new_per_iteration=100")
    value = ""
    if raw_value.strip():  # YAML, as in a config file; a value that is not YAML is the text itself
        value = parse_yaml(raw_value, f"--set {key}", ConfigError, lines=False, text_if_not_yaml=True)
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
            origins[tuple(parts[: depth + 1])] = "--set"
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a mapping, cannot set a key in it")
        node = child
    node[parts[-1]] = value
    path = tuple(parts)
    for stale in [p for p in origins if p[: len(path)] == path]:
        del origins[stale]
    origins[path] = "--set"


def _describe_validation_error(exc: ValidationError, origins: dict[KeyPath, str], top: Path) -> str:
    first = exc.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    key = ".".join(loc)
    source = _source_of(loc, origins, top)
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        valid = _valid_keys_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean {'.'.join((*loc[:-1], close[0]))!r}?" if close else f"valid keys: {', '.join(valid)}"
        return f"{source}: unknown key {key!r} ({hint}){more}"
    if first["type"] == "missing":
        return f"{source}: missing required key {key!r}{more}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        if not loc:
            # Checks across the whole config start their message with the key path they concern.
            named = tuple(message.split(":", 1)[0].split("."))
            return f"{_source_of(named, origins, top)}: {message}{more}"
        return f"{source}: {key}: {message}{more}"
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{source}: key {key!r}: {message}{shown}{more}"


def _source_of(loc: KeyPath, origins: dict[KeyPath, str], top: Path) -> str:
    for end in range(len(loc), 0, -1):
        if loc[:end] in origins:
            return origins[loc[:end]]
    return str(top)


def _valid_keys_at(loc: KeyPath) -> list[str]:
    """The field names of the config section at `loc` (dict entries like servers.<name> are skipped)."""
    annotation: Any = Config
    for part in loc:
        annotation = _unwrap_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = annotation.model_fields[part].annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
    annotation = _unwrap_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        non_none = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(non_none) == 1:
            return non_none[0]
    return annotation


def _resolve_paths(config: Config) -> None:
    """Make path fields absolute so later changes of working directory do not move them."""
    for dotted in PATH_FIELDS:
        *parents, leaf = dotted.split(".")
        node: Any = config
        for part in parents:
            node = getattr(node, part)
            if node is None:
                break
        if node is not None and getattr(node, leaf) is not None:
            setattr(node, leaf, _absolute(getattr(node, leaf), dotted))
    for dotted in PATH_LIST_FIELDS:
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, [_absolute(path, dotted) for path in getattr(node, leaf)])
    for name, server in config.servers.items():
        if server.model:
            server.model = _absolute(server.model, f"servers.{name}.model")
        if server.endpoint_dir:
            server.endpoint_dir = _absolute(server.endpoint_dir, f"servers.{name}.endpoint_dir")
        program = server.vllm.launcher[0]
        if "/" in program:  # a path (a bare name is looked up on PATH when the server starts)
            server.vllm.launcher[0] = str(Path(program).expanduser().absolute())


def _absolute(value: str, key: str) -> str:
    """`value` made absolute with its symlinks resolved; a symlink loop is a config error naming `key`."""
    try:
        return str(Path(value).expanduser().resolve())
    except (RuntimeError, OSError) as exc:  # Python 3.11: RuntimeError("Symlink loop from ..."); ~user unknown
        raise ConfigError(f"{key}: cannot resolve {value!r}: {exc}; fix the path") from None


# ----------------------------------------------------------------------------------------------
# Checks for commands that need more than the config itself
# ----------------------------------------------------------------------------------------------


def check_accelerate_config(config: Config) -> dict | None:
    """imitation.accelerate_config, when set, is a readable YAML mapping (accelerate checks its settings);
    returns that mapping (None when unset)."""
    path = config.imitation.accelerate_config
    if path is None:
        return None
    try:
        data = parse_yaml(read_text(path, ACCELERATE_CONFIG), path, ConfigError)
    except ConfigError as exc:
        raise ConfigError(f"imitation.accelerate_config: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"imitation.accelerate_config: {path}: not a mapping of accelerate settings; give an accelerate config "
            "file (configs/accelerate/*.yaml)"
        )
    return data


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML. It holds no secrets: keys live only in environment variables."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
