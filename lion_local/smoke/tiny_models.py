"""Tiny local models for the smoke mode: `lion-local make-tiny --out DIR`.

DIR/teacher and DIR/student are both LLaMA-architecture checkpoints (safetensors) with a
byte-level BPE tokenizer trained here on the seed instructions, so nothing is downloaded.

- The student is randomly initialised: imitation has to teach it everything.
- The teacher is trained for a fixed number of steps on a synthetic corpus rendered with the
  roles' real prompt templates, so that once served it answers instructions, reviews answer pairs
  with two scores that vary between instructions, and writes one new instruction from a seed. A
  fixed step count (not a time limit) keeps it deterministic for a seed; the default budget
  trains in about a minute on two CPU cores.

The build itself is lion_local/smoke/tiny_build.py. This module only decides whether one is needed, so
that every command that finds the models in place starts without importing torch (about 5 s).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lion_local.config import Config
from lion_local.run.state import lock_exclusively

logger = logging.getLogger(__name__)

def tiny_models_present(out_dir: Path) -> bool:
    """Both models are there (each appears only once complete: the build renames it into place)."""
    return (out_dir / "teacher").is_dir() and (out_dir / "student").is_dir()


def ensure_tiny_models(config: Config) -> None:
    """Smoke mode: build the tiny models named by config.tiny_models when they are absent.

    A lock file makes concurrent first uses (two jobs, two test workers) build them once.
    """
    if config.tiny_models is None:
        return
    out_dir = Path(config.tiny_models.dir)
    if tiny_models_present(out_dir):
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.with_name(out_dir.name + ".lock")
    with open(lock_path, "w") as lock:
        lock_exclusively(lock, lock_path, wait=True)
        if tiny_models_present(out_dir):
            return  # built by whoever held the lock before us
        from lion_local.smoke.tiny_build import TinyBuild, make_tiny_models  # torch and transformers: only to build

        logger.info("building the tiny smoke-mode models in %s (about a minute, once)", out_dir)
        make_tiny_models(out_dir, config.seed_data, TinyBuild(seed=config.tiny_models.seed))
