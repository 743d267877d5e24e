"""A run remembers what shaped it (lion_local/run/identity.py): a resume with a changed result-shaping
setting is refused naming the key, unless accepted (and then recorded); operational settings may
change freely; the teacher's cache key is the part of the same identity that shapes its replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.config import load_config
from lion_local.errors import InputError
from lion_local.roles import referee as referee_module
from lion_local.run.identity import changed_keys, flatten
from lion_local.stages.run_identity import check_resume, run_identity
from lion_local.run.layout import RunDir
from lion_local.stages.teacher_answers import teacher_fingerprint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny-cpu.yaml"


def _config(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"run_dir={tmp_path / 'run'}", *overrides])


def _started(tmp_path: Path, *overrides: str) -> RunDir:
    """A run whose first command recorded its identity and finished 1/imitation."""
    config = _config(tmp_path, *overrides)
    run = RunDir(config.run_dir)
    check_resume(run, config)
    run.state_json.write_text(json.dumps({"iteration": 1, "completed": ["1/imitation"], "stage_seconds": {}}))
    return run


def test_flatten_and_the_identity_leave_out_operational_settings(tmp_path):
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}
    identity = run_identity(_config(tmp_path))
    assert identity["discrimination.tau"] == 1.0 and identity["seed"] == 0
    assert "servers.teacher.model" in identity and "servers.teacher.vllm.dtype" in identity
    assert "prompts.referee.txt" in identity and identity["prompts.referee.SYSTEM_PROMPT"] == referee_module.SYSTEM_PROMPT
    for operational in ("run_dir", "servers.teacher.max_concurrency", "servers.teacher.request_timeout_s",
                        "servers.teacher.host", "servers.teacher.vllm.launcher", "discrimination.stream_reviews"):
        assert operational not in identity, operational


def test_changed_tau_is_refused_naming_the_key_and_accepted_with_the_override(tmp_path):
    run = _started(tmp_path)
    changed = _config(tmp_path, "discrimination.tau=2.0")
    with pytest.raises(InputError) as refused:
        check_resume(run, changed)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{run.identity}:")
    assert "discrimination.tau (1.0 -> 2.0)" in message and "--accept-change discrimination.tau" in message
    assert json.loads(run.identity.read_text())["settings"]["discrimination.tau"] == 1.0  # nothing written

    check_resume(run, changed, accepted=("discrimination.tau",), next_stage="1/discrimination")
    recorded = json.loads(run.identity.read_text())
    assert recorded["settings"]["discrimination.tau"] == 2.0
    [change] = recorded["accepted_changes"]
    assert change["next_stage"] == "1/discrimination"
    assert change["changes"] == {"discrimination.tau": {"from": 1.0, "to": 2.0}}
    check_resume(run, changed)  # the accepted value is now the run's own


def test_every_changed_key_must_be_accepted(tmp_path):
    run = _started(tmp_path)
    changed = _config(tmp_path, "discrimination.tau=2.0", "generation.rouge_threshold=0.5")
    with pytest.raises(InputError, match="generation.rouge_threshold .*--accept-change generation.rouge_threshold"):
        check_resume(run, changed, accepted=("discrimination.tau",))


def test_a_changed_referee_system_prompt_is_refused(tmp_path, monkeypatch):
    run = _started(tmp_path)
    with pytest.raises(InputError, match=r"roles\.referee\.system_prompt \(null -> \"You are a harsh judge.\"\)"):
        check_resume(run, _config(tmp_path, "roles.referee.system_prompt=You are a harsh judge."))
    # The built-in prompt is part of the identity too: editing the code cannot slip into a started run.
    monkeypatch.setattr(referee_module, "SYSTEM_PROMPT", "You are a harsh judge.")
    with pytest.raises(InputError, match=r"prompts\.referee\.SYSTEM_PROMPT"):
        check_resume(run, _config(tmp_path))
    check_resume(run, _config(tmp_path), accepted=("prompts.referee.SYSTEM_PROMPT",))


def test_operational_changes_are_accepted_without_a_word(tmp_path):
    run = _started(tmp_path)
    before = run.identity.read_text()
    check_resume(run, _config(
        tmp_path, "servers.teacher.max_concurrency=2", "servers.teacher.request_timeout_s=5",
        "servers.teacher.host=0.0.0.0", "discrimination.stream_reviews=false", "servers.student.port=8123",
    ))
    assert run.identity.read_text() == before


def test_the_cli_refuses_a_changed_resume_in_one_line_and_writes_nothing(tmp_path):
    run = _started(tmp_path)
    # The empty writer-lock file is all a refused command leaves (any earlier command made it too).
    snapshot = lambda: {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file() and p != run.lock}  # noqa: E731
    before = snapshot()
    result = CliRunner().invoke(main, [
        "stage", "discrimination", "--config", str(TINY), "--set", f"run_dir={run.root}", "--set", "discrimination.tau=3",
    ])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"error: {run.identity}:") and "discrimination.tau (1.0 -> 3.0)" in line
    assert snapshot() == before


def test_a_damaged_identity_file_is_one_line(tmp_path):
    run = _started(tmp_path)
    run.identity.write_text("{not json")
    with pytest.raises(InputError, match="cannot read the run's settings.*delete it to record the current settings"):
        check_resume(run, _config(tmp_path))


def test_changed_keys():
    assert changed_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b", "c"]
    assert changed_keys({"a": None}, {}) == ["a"]


def test_the_teacher_fingerprint_follows_what_shapes_its_replies(tmp_path):
    base = teacher_fingerprint(_config(tmp_path))
    assert teacher_fingerprint(_config(tmp_path, "servers.teacher.host=10.0.0.1", "servers.teacher.max_concurrency=1")) == base
    assert teacher_fingerprint(_config(tmp_path, "discrimination.tau=3")) == base  # the referee's business
    for shaping in ("servers.teacher.vllm.dtype=bfloat16", "roles.teacher.temperature=0.1", "seed=1",
                    "roles.teacher.system_prompt=Be brief.", "servers.teacher.engine=transformers"):
        assert teacher_fingerprint(_config(tmp_path, shaping)) != base, shaping
