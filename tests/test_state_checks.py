"""The run state is checked, not trusted (lion_local.run.preflight, lion_local.run.state, lion_local.run.identity).

- A stage state.json records as finished, whose outputs (lion_local.run.layout.finished_outputs)
  are missing or unreadable, is refused by `status` and `run` in one line naming the file and the
  repair (exit 2), before the next stage runs; only the iterations the next stage builds on are
  checked (its own and the one before), so older checkpoints may be pruned.
- Wrong-typed fields of state.json, and journal lines that are no JSON object or whose "id" is no
  string, are one line naming the file (and line), exit 2, where `status` used to crash.
- `--accept-change KEY` of a key that shapes nothing is refused naming the close valid ones.
- An accepted rise of `iterations` after a finished run re-opens the final imitation, which then
  trains on the new last iteration's instructions; fewer iterations than a finished one is refused.

The stages themselves are replaced by fakes that write what each real stage leaves (the servers
are never started), so each case runs the real command line in-process in well under a second.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.config import load_config
from lion_local.errors import InputError
from lion_local.stages.run_identity import check_resume
from lion_local.run.layout import FINAL, Iteration, RunDir, Stage, all_stages
from lion_local.run.records import instruction_record, pools_for
from lion_local.run.state import Journal, RunStateError, mark_completed, read_jsonl, read_state, write_atomic, write_jsonl_atomic
from lion_local.stages import loop
from test_environment_faults import files, one_line_error, write_config


@pytest.fixture(autouse=True)
def _keep_sigterm_handler():
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def invoke(config: Path, *args: str):
    return CliRunner().invoke(main, [*args, "--config", str(config)])


# ----------------------------------------------------------------------------------------------
# Fake stages: what each real stage leaves behind, and nothing started
# ----------------------------------------------------------------------------------------------


def fake_imitation(config, run: RunDir, iteration: Iteration, servers) -> None:
    train, _ = pools_for(config, run, iteration)
    directory = run.at(iteration)
    directory.student.mkdir(parents=True, exist_ok=True)
    (directory.student / "config.json").write_text('{"model_type": "llama"}\n')
    write_atomic(directory.imitation_summary, json.dumps({"train_pool": len(train)}) + "\n")


def fake_discrimination(config, run: RunDir, iteration: Iteration, servers) -> None:
    directory = run.at(iteration)
    cache = read_jsonl(directory.cache_pool)
    judgements = [{"id": r["id"], "teacher_score": 8.0, "student_score": 5.0, "gap": 3.0, "label": "hard"} for r in cache]
    write_jsonl_atomic(directory.judgements, judgements)
    write_atomic(directory.discrimination_summary, json.dumps({"hard": len(cache)}) + "\n")


def fake_generation(config, run: RunDir, iteration: Iteration, servers) -> None:
    directory = run.at(iteration)
    parent = read_jsonl(directory.cache_pool)[0]["id"]
    generated = [instruction_record(f"Task {i} made in iteration {iteration}", "", "hard", iteration.number, parent)
                 for i in range(2)]
    write_jsonl_atomic(directory.generated, generated)
    write_atomic(directory.generation_summary, json.dumps({"accepted": {"total": 2}}) + "\n")


def fake_report(run: RunDir, iteration: Iteration, unrecorded_seconds=None) -> dict:
    write_atomic(run.at(iteration).report, json.dumps({"iteration": iteration.json_value}) + "\n")
    return {}


class FakeServers:
    def __init__(self, *args, **kwargs) -> None:
        pass

    async def __aenter__(self) -> FakeServers:
        return self

    async def __aexit__(self, *exc_info) -> None:
        pass


@pytest.fixture
def fake_stages(monkeypatch) -> list[str]:
    """The stages the loop runs, in order, with fakes in place of the real ones."""
    ran: list[str] = []

    def recorded(function, name):
        async def stage(config, run, iteration, servers):
            ran.append(f"{iteration}/{name}")
            function(config, run, iteration, servers)

        return stage

    monkeypatch.setattr(loop, "run_imitation", recorded(fake_imitation, "imitation"))
    monkeypatch.setattr(loop, "run_discrimination", recorded(fake_discrimination, "discrimination"))
    monkeypatch.setattr(loop, "run_generation", recorded(fake_generation, "generation"))
    monkeypatch.setattr(loop, "write_iteration_report", fake_report)
    monkeypatch.setattr(loop, "ServerSet", FakeServers)
    return ran


def finished_run(tmp_path: Path, iterations: int, upto: str | None = None, **top) -> tuple[Path, RunDir]:
    """A run whose stages (through `upto`, default all) finished with the fakes' outputs, its
    identity recorded; returns (config path, run)."""
    config_path = write_config(tmp_path, tmp_path / "run", iterations=iterations, **top)
    config = load_config(config_path)
    run = RunDir(config.run_dir)
    check_resume(run, config)
    fakes = {"imitation": fake_imitation, "discrimination": fake_discrimination, "generation": fake_generation}
    for stage in all_stages(iterations, config.imitation.final_imitation):
        fakes[stage.name](config, run, stage.iteration, None)
        if stage.name == "generation" or stage.iteration.is_final:
            fake_report(run, stage.iteration)
        mark_completed(run, stage, 1.0)
        if str(stage) == upto:
            break
    return config_path, run


# ----------------------------------------------------------------------------------------------
# B1: a finished stage must still have its outputs
# ----------------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        path.rmdir()
    else:
        path.unlink()


def _folder_in_place(path: Path) -> None:
    _remove(path)
    path.mkdir()


DAMAGE = [
    # (file under the run, what is done to it, the problem named, the markers the repair removes)
    ("iter_1/train_pool.jsonl", _remove, "missing", '"1/imitation", "1/discrimination", "1/generation"'),
    ("iter_1/cache_pool.jsonl", _remove, "missing", '"1/imitation", "1/discrimination", "1/generation"'),
    ("iter_1/student", _remove, "missing", '"1/imitation", "1/discrimination", "1/generation"'),
    ("iter_1/judgements.jsonl", _folder_in_place, "a folder, not a file", '"1/discrimination", "1/generation"'),
    ("iter_1/generated.jsonl", _remove, "missing", 'remove "1/generation" from'),
    ("iter_1/report.json", _remove, "missing", 'remove "1/generation" from'),
]


@pytest.mark.parametrize("name, damage, problem, markers", DAMAGE, ids=[case[0] for case in DAMAGE])
def test_a_finished_stage_whose_output_is_gone_is_refused_naming_file_and_repair(
    tmp_path: Path, fake_stages: list[str], name: str, damage, problem: str, markers: str
):
    config, run = finished_run(tmp_path, iterations=2, upto="1/generation")
    damage(run.root / name)
    before = {path: data for path, data in files(run.root).items() if path != ".lock"}
    expected = [f"{run.root / name}: {problem}, although {run.state_json} records", markers, 'from "completed" in state.json']
    line = one_line_error(invoke(config, "status"), 2, *expected)
    assert "restore it" in line
    assert one_line_error(invoke(config, "run"), 2, *expected) == line
    assert fake_stages == []  # nothing ran
    assert {path: data for path, data in files(run.root).items() if path != ".lock"} == before


def test_a_repair_that_follows_the_message_runs_the_stages_again(tmp_path: Path, fake_stages: list[str]):
    config, run = finished_run(tmp_path, iterations=2, upto="2/imitation")
    (run.iteration(1) / "generated.jsonl").unlink()
    line = one_line_error(invoke(config, "run"), 2, 'remove "1/generation", "2/imitation" from "completed"',
                          "and move iter_2/ away")
    assert line
    state = read_state(run)
    state["completed"] = [m for m in state["completed"] if m not in ("1/generation", "2/imitation")]
    write_atomic(run.state_json, json.dumps(state))
    run.iteration(2).path.rename(tmp_path / "iter_2.old")
    result = invoke(config, "run")
    assert result.exit_code == 0, result.output
    assert fake_stages == ["1/generation", "2/imitation", "2/discrimination", "2/generation", "final/imitation"]


def test_a_whole_run_passes_the_checks(tmp_path: Path, fake_stages: list[str]):
    config, run = finished_run(tmp_path, iterations=1, upto="1/discrimination")
    result = invoke(config, "status")
    assert result.exit_code == 0, result.output
    assert "1/discrimination" in result.stdout and "next stage 1/generation" in result.stdout
    result = invoke(config, "run")
    assert result.exit_code == 0, result.output
    assert fake_stages == ["1/generation", "final/imitation"]
    assert read_state(run)["completed"][-1] == "final/imitation"


def test_an_older_iteration_the_loop_no_longer_reads_may_be_pruned(tmp_path: Path, fake_stages: list[str]):
    """The next stage builds on its own iteration and the one before: iteration 1's checkpoint,
    once iteration 3 is under way, may be deleted to save disk."""
    config, run = finished_run(tmp_path, iterations=3, upto="3/imitation")
    _remove(run.iteration(1).student)
    result = invoke(config, "status")
    assert result.exit_code == 0, result.output
    _remove(run.iteration(2).student)  # 3/imitation started from it; the final imitation may copy it
    one_line_error(invoke(config, "status"), 2, f"{run.iteration(2).student}: missing")
    (run.iteration(2).student).mkdir()
    result = invoke(config, "run")
    assert result.exit_code == 0, result.output
    assert fake_stages == ["3/discrimination", "3/generation", "final/imitation"]


# ----------------------------------------------------------------------------------------------
# B2: wrong types in state.json and in journal lines
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"stage_seconds": {"1/imitation": "12"}}, "'stage_seconds' of '1/imitation' must be a number of seconds from 0, not \"12\""),
        ({"stage_seconds": {"1/imitation": -3}}, "'stage_seconds' of '1/imitation' must be a number of seconds from 0, not -3"),
        ({"stage_seconds": {"1/imitation": True}}, "'stage_seconds' of '1/imitation' must be a number of seconds from 0, not true"),
        ({"stage_seconds": ["1/imitation"]}, "'stage_seconds' must be an object"),
        ({"iteration": "2"}, "'iteration' must be a number from 0, not \"2\""),
        ({"iteration": True}, "'iteration' must be a number from 0, not true"),
        ({"iteration": -1}, "'iteration' must be a number from 0, not -1"),
        ({"completed": ["1/imitation", 3]}, "'completed' must be a list of stage names"),
    ],
)
def test_wrong_typed_state_fields_are_one_line(tmp_path: Path, fake_stages: list[str], fields: dict, problem: str):
    config, run = finished_run(tmp_path, iterations=2, upto="1/imitation")
    state = {**read_state(run), **fields}
    run.state_json.write_text(json.dumps(state))
    for command in (["status"], ["run"], ["iteration"]):
        one_line_error(invoke(config, *command), 2, f"{run.state_json}: {problem}", "restore it")
    assert fake_stages == []


@pytest.mark.parametrize(
    "name, lines, where, problem",
    [
        ("teacher_answers.jsonl", ['{"id": "a", "answer": "x"}', "[1, 2]"], 2, "a JSON list, not an object"),
        ("teacher_answers.jsonl", ['"just a string"', '{"id": "a"}'], 1, "a JSON str, not an object"),
        ("iter_1/train_pool.jsonl", ['{"id": 5, "instruction": "x", "input": ""}'], 1, '"id" is 5, not a string'),
        ("iter_1/cache_pool.jsonl", ['{"instruction": "x", "input": ""}'], 1, 'no "id"'),
    ],
)
def test_journal_lines_of_the_wrong_type_are_one_line_naming_file_and_line(
    tmp_path: Path, fake_stages: list[str], name: str, lines: list[str], where: int, problem: str
):
    config, run = finished_run(tmp_path, iterations=2, upto="1/imitation")
    (run.root / name).write_text("".join(line + "\n" for line in lines))
    before = files(run.root)
    one_line_error(invoke(config, "status"), 2, f"{run.root / name}:{where}: {problem}", "edited or corrupted")
    assert files(run.root) == before


def test_a_journal_that_opens_a_non_object_line_is_refused_and_left_as_it_is(tmp_path: Path):
    path = tmp_path / "calls.jsonl"
    path.write_text('{"id": "a"}\n[1]\n{"id": "b"}\n')
    with pytest.raises(RunStateError, match=rf"{path}:2: a JSON list, not an object"):
        Journal(path)
    assert path.read_text() == '{"id": "a"}\n[1]\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\n{"id": 7}\n')  # not a file keyed by id: any id goes
    assert read_jsonl(path) == [{"id": "a"}, {"id": 7}]


# ----------------------------------------------------------------------------------------------
# B3: --accept-change of a key that shapes nothing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, expected",
    [
        ("discrimination.taux", "did you mean discrimination.tau"),
        ("iteration", "did you mean iterations?"),
        ("servers.teacher.port", "an operational setting, which may change without --accept-change; leave it out"),
        ("no_such_setting_at_all", "`lion-local config` prints the settings"),
    ],
)
def test_an_accept_change_of_no_result_shaping_key_is_one_line(tmp_path: Path, fake_stages: list[str], key: str, expected: str):
    config = write_config(tmp_path, tmp_path / "run")
    one_line_error(invoke(config, "run", "--accept-change", key), 2, f"--accept-change {key}: ", expected)
    assert not (tmp_path / "run").exists()  # refused before anything is written
    config, run = finished_run(tmp_path / "started", iterations=2, upto="1/imitation")
    before = files(run.root)
    one_line_error(invoke(config, "run", "--accept-change", key), 2, f"--accept-change {key}: ", expected)
    assert files(run.root) == before


def test_an_accept_change_of_a_recorded_key_is_valid(tmp_path: Path):
    config = load_config(write_config(tmp_path, tmp_path / "run"))
    run = RunDir(config.run_dir)
    check_resume(run, config, accepted=("discrimination.tau", "prompts.referee.SYSTEM_PROMPT"))
    with pytest.raises(InputError, match="did you mean discrimination.tau"):
        check_resume(run, config, accepted=("discrimination.ta",))


# ----------------------------------------------------------------------------------------------
# B4: a change of `iterations`
# ----------------------------------------------------------------------------------------------


def test_more_iterations_after_a_finished_run_reopen_the_final_imitation(tmp_path: Path, fake_stages: list[str]):
    config, run = finished_run(tmp_path, iterations=1)
    old_final_pool = read_jsonl(run.final.train_pool)
    assert {r["iteration"] for r in old_final_pool} == {1}
    result = invoke(config, "run", "--set", "iterations=2")
    one_line_error(result, 2, "iterations (1 -> 2)", "--accept-change iterations")
    assert fake_stages == []

    result = invoke(config, "run", "--set", "iterations=2", "--accept-change", "iterations")
    assert result.exit_code == 0, result.output
    assert fake_stages == ["2/imitation", "2/discrimination", "2/generation", "final/imitation"]
    assert {r["iteration"] for r in read_jsonl(run.final.train_pool)} == {2}  # iteration 2's instructions now
    aside = run.superseded("final-iterations-1") / "final"
    assert read_jsonl(aside / "train_pool.jsonl") == old_final_pool
    state = read_state(run)
    assert state["completed"] == [str(s) for s in all_stages(2, True)]
    identity = json.loads(run.identity.read_text())
    assert identity["settings"]["iterations"] == 2
    assert identity["accepted_changes"][-1]["changes"] == {"iterations": {"from": 1, "to": 2}}
    result = invoke(config, "status", "--set", "iterations=2")
    assert result.exit_code == 0 and "complete" in result.stdout.splitlines()[0], result.output


def test_an_accepted_rise_killed_halfway_is_finished_by_the_same_command(tmp_path: Path, fake_stages: list[str]):
    config, run = finished_run(tmp_path, iterations=1)
    real_replace = os.replace

    def killed_before_final_moves(source, target):
        if Path(source) == run.final.path:
            raise KeyboardInterrupt
        return real_replace(source, target)

    # Killed after the marker left state.json, before final/ moved and identity.json was written.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", killed_before_final_moves)
        result = invoke(config, "run", "--set", "iterations=2", "--accept-change", "iterations")
    assert result.exit_code != 0 and fake_stages == []
    assert "final/imitation" not in read_state(run)["completed"] and run.final.exists()
    assert json.loads(run.identity.read_text())["settings"]["iterations"] == 1  # not recorded yet
    result = invoke(config, "run", "--set", "iterations=2", "--accept-change", "iterations")
    assert result.exit_code == 0, result.output
    assert fake_stages == ["2/imitation", "2/discrimination", "2/generation", "final/imitation"]
    assert {r["iteration"] for r in read_jsonl(run.final.train_pool)} == {2}
    assert json.loads(run.identity.read_text())["settings"]["iterations"] == 2


@pytest.mark.parametrize("upto", ["2/imitation", "final/imitation"])
def test_fewer_iterations_than_a_finished_one_are_refused(tmp_path: Path, fake_stages: list[str], upto: str):
    config, run = finished_run(tmp_path, iterations=2, upto=upto)
    before = files(run.root)
    expected = [f"{run.state_json}: records 2/", "as finished, but the config has iterations: 1",
                "set iterations to 2 or more (--set iterations=2)"]
    for command in (["run", "--accept-change", "iterations"], ["run"], ["status"]):
        one_line_error(invoke(config, *command, "--set", "iterations=1"), 2, *expected)
    assert fake_stages == [] and files(run.root) == before
    result = invoke(config, "status", "--set", "iterations=3")  # more is fine to look at
    assert result.exit_code == 0, result.output
