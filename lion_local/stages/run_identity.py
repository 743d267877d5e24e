"""A run's identity: its config's result-shaping settings plus the text of every role prompt.

lion_local.run.identity keeps the rules (which settings are operational, how a change is
refused or accepted, identity.json); this module adds what only the roles know, their prompts,
so a run and the caches keyed by its identity (teacher answers, reviews) notice an edited prompt.
"""

from __future__ import annotations

from typing import Any

from lion_local.config import Config
from lion_local.roles import prompt_texts
from lion_local.run.identity import identity_digest, record_or_refuse, refuse_unknown_accepts, settings_identity
from lion_local.run.layout import RunDir


def run_identity(config: Config) -> dict[str, Any]:
    """{dotted key: value} of everything that can change the run's results."""
    return settings_identity(config, prompt_texts())


def check_resume(run: RunDir, config: Config, accepted: tuple[str, ...] = (), next_stage: str = "") -> None:
    """Record the run's identity, or refuse a config whose result-shaping settings changed
    (lion_local.run.identity.record_or_refuse); call it with the writer lock held."""
    record_or_refuse(run, run_identity(config), accepted, next_stage)


def check_accepted(run: RunDir, config: Config, accepted: tuple[str, ...]) -> None:
    """Refuse an --accept-change KEY that shapes nothing in this run; writes nothing."""
    refuse_unknown_accepts(run, run_identity(config), accepted)


def role_fingerprint(config: Config, role: str) -> str:
    """The part of the run's identity that shapes a role's replies: its server (model, engine,
    dtype, ...), the role's settings (sampling, system prompt, prompt format), its prompt
    templates and the run seed. Answers journaled under it are reused while it holds."""
    prefixes = (f"servers.{getattr(config.roles, role).server}.", f"roles.{role}.", f"prompts.{role}")
    return identity_digest(run_identity(config), prefixes, keys=("seed",))
