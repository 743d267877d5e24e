"""Shared fixtures and the suite's order.

- The tiny models are built once per set of inputs (the build's code, the seed data, the
  library versions) into .cache/tiny-models/<key>/ under the checkout, under a file lock, so
  that the test workers (pytest-xdist) and later sessions share one build (about a minute on
  2 cores) instead of one each.
- One real teacher server (`transformers serve`, via `lion-local serve teacher`) per worker for
  every test that asks for one.
- Files run heaviest first, so that `make test`'s workers (`--dist loadfile`) finish together.
"""

from __future__ import annotations

import os

# Test files run two at a time on two cores. OpenMP threads that spin while they wait (the default)
# take the cores from the other file's processes: a 2-thread greedy generate on the tiny teacher
# took 45.7 s beside a busy neighbour, 0.59 s with passive waiting (docs/benchmarks.md). Set
# before torch is imported; every process the tests start inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib  # noqa: E402
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from serving.process import free_port
from loop_checks import served_teacher, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CACHE = ROOT / ".cache" / "tiny-models"
# What a tiny build depends on: its code, the prompt templates it renders, the seed data.
TINY_INPUTS = ("lion_local/smoke", "lion_local/roles", "lion_local/data/smoke_seed.jsonl", "lion_local/run/seed_data.py")
TINY_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")

# Seconds each heavy file took in one `make test` (two workers, docs/benchmarks.md): only the order
# files are handed to the workers in, heaviest first. Files not named here are light and come last.
HEAVY_FILES = {
    "test_fault_tolerance.py": 375, "test_real_model.py": 290, "test_slurm.py": 165, "test_vllm.py": 140,
    "test_loop_integration.py": 110, "test_loop_commands.py": 100, "test_paper_scale.py": 100,
    "test_multiprocess_training.py": 95, "test_roles_integration.py": 95, "test_signals.py": 65,
    "test_server_ownership.py": 50, "test_signal_arms.py": 120,
}


# Fixtures that build models or start servers: a test that asks for one belongs to the integration tier.
HEAVY_FIXTURES = {"tiny_models", "teacher_url", "tiny_run_config"}


def pytest_collection_modifyitems(config, items) -> None:
    """Heaviest files first (a stable sort keeps each file's own order); every test that asks for
    a heavy fixture carries the `integration` mark, so that `make test-fast` leaves it out."""
    unmarked = [item.nodeid for item in items
                if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("integration")]
    if unmarked:
        raise pytest.UsageError(f"mark these tests integration (they build models or start servers): {unmarked}")
    items.sort(key=lambda item: -HEAVY_FILES.get(item.path.name, 0))


def tiny_build_key() -> str:
    """A digest of everything a tiny build depends on."""
    digest = hashlib.sha256()
    for name in TINY_INPUTS:
        path = ROOT / name
        for file in sorted(path.rglob("*") if path.is_dir() else [path]):
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0" + file.read_bytes())
    for library in TINY_LIBRARIES:
        digest.update(f"{library}=={metadata.version(library)}".encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny teacher and student, built once per key and shared (read them, never write into them)."""
    from lion_local.smoke.tiny_models import tiny_models_present

    out_dir = TINY_CACHE / tiny_build_key()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if not tiny_models_present(out_dir):
            from lion_local.smoke.tiny_build import make_tiny_models

            make_tiny_models(out_dir)
    return out_dir


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
    with served_teacher(config, port) as url:
        yield url
