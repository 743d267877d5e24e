"""Shared fixtures: the tiny models are built once per test session (about a minute on 2 cores);
one real teacher server for every test that asks for one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.process import free_port
from loop_checks import stop, tiny_config, wait_healthy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from lion_local.smoke.tiny_build import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def tiny_run_config(tiny_models: Path, tmp_path: Path) -> Path:
    """configs/tiny-cpu-transformers.yaml with its models and run directory moved under the test's tmp_path."""
    data = yaml.safe_load((ROOT / "configs/tiny-cpu-transformers.yaml").read_text())
    data["run_dir"] = str(tmp_path / "run")
    data["seed_data"] = str(ROOT / "lion_local/data/smoke_seed.jsonl")
    data["tiny_models"]["dir"] = str(tiny_models)
    data["servers"]["teacher"]["model"] = str(tiny_models / "teacher")
    data["servers"]["student"]["model"] = str(tiny_models / "student")
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def teacher_url(tiny_models: Path, tmp_path_factory) -> str:
    """A real transformers serve process with the tiny teacher, started by `lion-local serve`."""
    directory = tmp_path_factory.mktemp("teacher-service")
    data = tiny_config(tiny_models, directory / "serve-run")
    port = free_port()
    data["servers"]["teacher"]["port"] = port
    config = directory / "serve.yaml"
    config.write_text(yaml.safe_dump(data))
    log = open(directory / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "lion_local", "serve", "teacher", "--config", str(config)], stdout=log, stderr=log
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
        log.close()
