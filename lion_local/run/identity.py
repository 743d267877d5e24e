"""What shaped a run's results, remembered in identity.json, so a resume cannot silently mix settings.

The identity of a config is every setting of it, flattened to dotted keys, less the operational
ones that cannot change a reply (OPERATIONAL: where servers run and how they are reached,
concurrency, timeouts, retries of failed HTTP attempts, log and checkpoint cadence), plus the
text of every role prompt the package ships (lion_local.stages.run_identity adds them). A new setting is
therefore result-shaping until it is listed here as operational: forgetting to list one refuses
a harmless resume, never allows a harmful one.

The first command of a run records its identity. Each later command compares: a changed key is
refused in one line naming it, unless the command accepts it (`--accept-change KEY`); accepted
changes are recorded with the stage the run had reached, and the new values become the run's.
Only a result-shaping key can be accepted: another name is refused naming the close ones. An
accepted rise of `iterations` re-opens the final imitation (it trained on the old last
iteration's instructions): its marker leaves state.json and its files move to superseded/.
The caches that outlive a stage (the teacher's answers, evaluate's judgements) are keyed by the
part of the same identity that shapes their replies (`identity_digest`).
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import logging
import time
from typing import Any

from lion_local.config import Config
from lion_local.errors import InputError
from lion_local.run.layout import RunDir
from lion_local.run.state import reopen_final, write_atomic

logger = logging.getLogger(__name__)

OPERATIONAL = (
    "run_dir",
    "seed_data",  # read once: the first Cache Pool, written when the run starts, holds the seeds
    "tiny_models.dir",
    "evaluation.*",  # `lion-local evaluate` keys its own results; it never changes the run
    "roles.*.warn_truncated_share",  # a warning only
    "discrimination.stream_reviews",
    "discrimination.referee_check.*",  # measures the referee and may stop a stage; changes no judgement
    "imitation.accelerate_config",
    "imitation.rendezvous_port",
    "imitation.trainer.logging_steps",
    "imitation.trainer.save_steps",
    "servers.*.base_urls",
    "servers.*.endpoint_dir",
    "servers.*.api_key_env",
    "servers.*.allow_open_server",
    "servers.*.use_env_proxy",
    "servers.*.host",
    "servers.*.port",
    "servers.*.startup_timeout_s",
    "servers.*.stop_grace_s",
    "servers.*.keep_running_during_training",
    "servers.*.max_concurrency",
    "servers.*.request_timeout_s",
    "servers.*.failure_budget_s",
    "servers.*.backoff_*",
    "servers.*.vllm.launcher",
    "servers.*.vllm.tensor_parallel_size",
    "servers.*.vllm.data_parallel_size",
    "servers.*.vllm.gpu_memory_utilization",
    "servers.*.vllm.enforce_eager",
    "servers.*.vllm.cpu_*",
    "servers.*.transformers.device",
)
_SHOWN_CHARS = 40


# ----------------------------------------------------------------------------------------------
# Decisions (pure)
# ----------------------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {dotted key: leaf value}; lists are leaves."""
    if not isinstance(value, dict) or (prefix and not value):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, child in value.items():
        flat.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def settings_identity(config: Config, prompts: dict[str, str]) -> dict[str, Any]:
    """{dotted key: value} of everything that can change the run's results: the config's
    result-shaping settings and the text of each prompt in `prompts` (by name)."""
    settings = flatten(config.model_dump(mode="json"))
    shaping = {key: value for key, value in settings.items() if not any(fnmatch.fnmatchcase(key, p) for p in OPERATIONAL)}
    shaping.update({f"prompts.{name}": text for name, text in prompts.items()})
    return shaping


def identity_digest(identity: dict[str, Any], prefixes: tuple[str, ...], keys: tuple[str, ...] = ()) -> str:
    """A short hash of the identity's keys that start with one of `prefixes` or are in `keys`."""
    part = {key: value for key, value in identity.items() if key.startswith(prefixes) or key in keys}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def changed_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose value differs, or that one side lacks, in sorted order."""
    return sorted(key for key in recorded.keys() | current.keys() if recorded.get(key, _MISSING) != current.get(key, _MISSING))


_MISSING = object()


def _shown(value: Any) -> str:
    text = "(unset)" if value is _MISSING else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def describe_change(key: str, recorded: dict[str, Any], current: dict[str, Any]) -> str:
    return f"{key} ({_shown(recorded.get(key, _MISSING))} -> {_shown(current.get(key, _MISSING))})"


def accepted_key_problem(key: str, recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why `--accept-change KEY` names no result-shaping key of the run (recorded or current), or None."""
    if key in recorded or key in current:
        return None
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in OPERATIONAL):
        return f"--accept-change {key}: an operational setting, which may change without --accept-change; leave it out"
    close = difflib.get_close_matches(key, sorted(recorded.keys() | current.keys()), n=3, cutoff=0.7)
    guess = f"did you mean {' or '.join(close)}?" if close else "`lion-local config` prints the settings"
    return f"--accept-change {key}: not a setting that shapes this run's results; {guess}"


# ----------------------------------------------------------------------------------------------
# identity.json
# ----------------------------------------------------------------------------------------------


def record_or_refuse(run: RunDir, current: dict[str, Any], accepted: tuple[str, ...] = (), next_stage: str = "") -> None:
    """Record the run's identity `current`, or refuse it when its result-shaping settings changed.

    Call it with the writer lock held, before anything of the command is written.
    """
    refuse_unknown_accepts(run, current, accepted)
    if not run.identity.exists():
        if run.state_json.exists():
            logger.warning("%s: no record of the settings that shaped this run; recording the current ones", run.root)
        _write(run, {"settings": current, "accepted_changes": []})
        return
    recorded = _read(run)
    changed = changed_keys(recorded["settings"], current)
    if not changed:
        return
    refused = [key for key in changed if key not in accepted]
    if refused:
        described = "; ".join(describe_change(key, recorded["settings"], current) for key in refused)
        flags = " ".join(f"--accept-change {key}" for key in refused)
        raise InputError(
            f"{run.identity}: this run was made with other settings that shape its results: {described}; "
            f"restore them, or continue with the new values by passing {flags} (recorded in the run)"
        )
    for key in changed:
        logger.warning("%s: continuing with a changed setting: %s", run.root, describe_change(key, recorded["settings"], current))
    old, new = recorded["settings"].get("iterations"), current.get("iterations")
    if isinstance(old, int) and isinstance(new, int) and new > old:
        # The final imitation trained on iteration `old`'s instructions; now it must train on `new`'s.
        # (Fewer iterations than a finished one are refused before: lion_local.run.preflight.)
        reopen_final(run, run.superseded(f"final-iterations-{old}"))
    recorded["accepted_changes"].append({
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "next_stage": next_stage,
        "changes": {key: {"from": recorded["settings"].get(key), "to": current.get(key)} for key in changed},
    })
    recorded["settings"] = current
    _write(run, recorded)


def refuse_unknown_accepts(run: RunDir, current: dict[str, Any], accepted: tuple[str, ...]) -> None:
    """Refuse, in one line naming close valid keys, an --accept-change KEY that shapes nothing in
    the identity `current`; reads identity.json (if any) and writes nothing."""
    if not accepted:
        return
    recorded = _read(run)["settings"] if run.identity.exists() else {}
    for key in accepted:
        problem = accepted_key_problem(key, recorded, current)
        if problem is not None:
            raise InputError(problem)


def _read(run: RunDir) -> dict:
    hint = "restore it, or delete it to record the current settings as the run's"
    try:
        recorded = json.loads(run.identity.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{run.identity}: cannot read the run's settings: {exc}; {hint}") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("settings"), dict):
        raise InputError(f"{run.identity}: must be a JSON object with 'settings'; {hint}")
    recorded.setdefault("accepted_changes", [])
    return recorded


def _write(run: RunDir, recorded: dict) -> None:
    write_atomic(run.identity, json.dumps(recorded, indent=2, ensure_ascii=False) + "\n")
