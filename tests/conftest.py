"""Shared fixtures: the tiny models are built once per test session (about a minute on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from lion_local.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def tiny_run_config(tiny_models: Path, tmp_path: Path) -> Path:
    """configs/tiny-cpu.yaml with its models and run directory moved under the test's tmp_path."""
    data = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    data["run_dir"] = str(tmp_path / "run")
    data["seed_data"] = str(ROOT / "lion_local/data/smoke_seed.jsonl")
    data["tiny_models"]["dir"] = str(tiny_models)
    data["servers"]["teacher"]["model"] = str(tiny_models / "teacher")
    data["servers"]["student"]["model"] = str(tiny_models / "student")
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
