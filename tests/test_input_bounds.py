"""Input bounds: every bad input is exit 2 with one "error:" line naming the file or key, before anything
is written (the run directory is not created), never a traceback. By class:

1. input files (lion_local.input_files): a FIFO, a device or a symlink loop where a seed file, a
   config file, an included file or a question file belongs; nesting 100,000 deep; a 5,000-digit
   number; NaN; a lone surrogate ("\\ud800") in a string or a key; YAML aliases that expand without end;
   a file over its size cap;
2. config values: NaN and infinity in float keys, seeds beyond 32 bits, an empty run_dir, two servers
   on one port, counts beyond what a run (or `lion-local plan`) can plan for;
3. imitation.trainer, checked against trl's SFTConfig at config load (types, finite, ranges);
4. a seed file without a seed instruction;
5. a model directory that holds no loadable model (config.json with a model_type, and weights);
6. float and integer options of the command line (nan where click's FloatRange would take it);
7. `make-tiny --out` where no folder can be written.

The workspace (a good config, good seeds, two stand-in model directories) is tests/test_bad_inputs.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.config import CONFIG_FILE
from test_bad_inputs import (  # noqa: F401 (ws and _keep_sigterm_handler: the fixtures)
    GOOD_JSONL,
    GOOD_SEEDS,
    ROOT,
    Workspace,
    _assert_one_line_error,
    _check_case,
    _invoke,
    _keep_sigterm_handler,
    _jsonl,
    _snapshot,
    ws,
)

DEEP = 100_000
HUGE = "9" * 5000


def _fifo(ws: Workspace, name: str) -> Path:
    path = ws.root / name
    os.mkfifo(path)
    return path


def _loop(ws: Workspace, name: str) -> Path:
    """name -> name.other -> name: opening either fails with ELOOP."""
    path, other = ws.root / name, ws.root / f"{name}.other"
    path.symlink_to(other)
    other.symlink_to(path)
    return path


def _run_with_seeds(ws: Workspace, seeds: Path, expected: list[str], command: tuple[str, ...] = ("run",)) -> str:
    return _check_case(ws, list(command), ["--config", str(ws.config(seed_data=str(seeds)))], expected)


# ----------------------------------------------------------------------------------------------
# 1. Input files: what the reader refuses before it opens, and what it refuses in the contents
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("run",), ("stage", "imitation"), ("plan",)], ids=" ".join)
def test_a_fifo_as_the_seed_file_is_refused_without_blocking(ws: Workspace, command):
    fifo = _fifo(ws, "seeds.fifo")
    _run_with_seeds(ws, fifo, [f"{fifo}: cannot read seed data file: it is a FIFO, not a regular file"], command)


def test_a_fifo_seed_file_in_a_real_process_does_not_hang(ws: Workspace):
    fifo = _fifo(ws, "seeds.fifo")
    config = ws.config(seed_data=str(fifo))
    completed = subprocess.run(
        [sys.executable, "-m", "lion_local", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=ws.root, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == ""
    assert completed.stderr.splitlines() == [f"error: {fifo}: cannot read seed data file: it is a FIFO, not a regular file; "
                                             "give the path of a regular file"]
    assert not ws.run_dir.exists()


def test_a_device_as_the_seed_file_is_refused(ws: Workspace):
    _run_with_seeds(ws, Path("/dev/null"), ["/dev/null: cannot read seed data file: it is a character device"])


def test_a_fifo_as_the_config_file(ws: Workspace):
    fifo = _fifo(ws, "config.fifo")
    _check_case(ws, ["run"], ["--config", str(fifo)], [f"{fifo}: cannot read config file: it is a FIFO"])


def test_a_fifo_as_an_included_file(ws: Workspace):
    ws.config("base.yaml")
    fifo = _fifo(ws, "part.yaml")
    top = ws.write("top.yaml", "include: [base.yaml, part.yaml]\n")
    _check_case(ws, ["run"], ["--config", str(top)], [f"{fifo}: cannot read config file (included from {top}): it is a FIFO"])


def test_a_fifo_as_a_decontamination_question_file(ws: Workspace):
    fifo = _fifo(ws, "questions.jsonl")
    config = ws.config(generation={"decontamination": {"question_files": [str(fifo)]}})
    _check_case(ws, ["run"], ["--config", str(config)], [
        "generation.decontamination.question_files:", f"{fifo}: cannot read question file: it is a FIFO",
    ])


@pytest.mark.parametrize("given", ["config", "option"])
def test_a_fifo_as_the_evaluation_question_file(ws: Workspace, given: str):
    fifo = _fifo(ws, "questions.jsonl")
    if given == "config":
        args = ["--config", str(ws.config(evaluation={"questions": str(fifo)}))]
    else:
        args = ["--config", str(ws.config()), "--questions", str(fifo)]
    _check_case(ws, ["evaluate"], args, [f"{fifo}: cannot read question file: it is a FIFO"])


def test_symlink_loops(ws: Workspace):
    seeds = _loop(ws, "looped-seeds.jsonl")
    _run_with_seeds(ws, seeds, ["seed_data: cannot resolve", "Symlink loop"])
    config = _loop(ws, "looped.yaml")
    _check_case(ws, ["run"], ["--config", str(config)], [f"{config}: cannot read config file", "symbolic links"])
    ws.config("base.yaml")
    top = ws.write("top.yaml", "include: [base.yaml, part.yaml]\n")
    part = _loop(ws, "part.yaml")
    _check_case(ws, ["config"], ["--config", str(top)], [f"{part}: cannot read config file (included from {top})"])
    questions = _loop(ws, "looped-questions.jsonl")
    args = ["--config", str(ws.config()), "--questions", str(questions)]
    _check_case(ws, ["evaluate"], args, [f"{questions}: cannot read question file", "symbolic links"])
    config = ws.config("listed.yaml", generation={"decontamination": {"question_files": [str(questions)]}})
    _check_case(ws, ["run"], ["--config", str(config)], ["generation.decontamination.question_files: cannot resolve"])


SEED_CONTENTS = {
    "json-list-nested-100000-deep": ("seeds.json", "[" * DEEP + "]" * DEEP, ["{path}: nested deeper than 64 levels"]),
    "jsonl-line-nested-100000-deep": (
        "seeds.jsonl", GOOD_JSONL.decode() + '{"instruction": ' + "[" * DEEP + "]" * DEEP + "}\n",
        ["{path}:5: nested deeper than 64 levels"],
    ),
    "json-list-nested-65-deep": ("seeds.json", "[" * 65 + "]" * 65, ["{path}: nested deeper than 64 levels"]),
    "5000-digit-number-in-json-list": (
        "seeds.json", '[\n  {"instruction": "Name a colour.", "n": ' + HUGE + "}\n]\n",
        ["{path}:2: the integer 999999999999...9999 (5000 characters) is out of range"],
    ),
    "5000-digit-number-in-jsonl": (
        "seeds.jsonl", GOOD_JSONL.decode() + '{"instruction": "Count.", "n": ' + HUGE + "}\n", ["{path}:5: the integer"],
    ),
    "nan-in-json-list": ("seeds.json", '[\n{"instruction": "A.", "n": NaN}\n]', ["{path}:2: NaN is not a number"]),
    "float-beyond-range": ("seeds.jsonl", '{"instruction": "A.", "n": 1e400}\n', ["{path}:1: the number 1e400"]),
    "lone-surrogate-in-jsonl": (
        "seeds.jsonl", GOOD_JSONL.decode() + '{"instruction": "Broken \\ud800 text."}\n',
        ["{path}:5: a string holds a lone surrogate (\\ud800)"],
    ),
    "lone-surrogate-in-a-key": ("seeds.jsonl", '{"instruction": "A.", "\\udc00": 1}\n', ["{path}:1: a string holds a lone"]),
    "lone-surrogate-in-json-list": (
        "seeds.json", '[\n  {"instruction": "Fine."},\n  {"instruction": "x\\ud800"}\n]\n', ["{path}:3: a string holds a lone"],
    ),
}


@pytest.mark.parametrize("name, content, expected", list(SEED_CONTENTS.values()), ids=list(SEED_CONTENTS))
def test_bad_seed_contents(ws: Workspace, name: str, content: str, expected: list[str]):
    seeds = ws.write(name, content)
    _run_with_seeds(ws, seeds, [part.format(path=seeds) for part in expected])


@pytest.mark.parametrize("line, expected", [
    ('{"question": "Why \\ud800?"}', "a string holds a lone surrogate (\\ud800)"),
    ('{"question": "Deep?", "x": ' + "[" * DEEP + "]" * DEEP + "}", "nested deeper than 64 levels"),
    ('{"question": "Big?", "id": ' + HUGE + "}", "the integer 999999999999...9999"),
], ids=["lone-surrogate", "nested-100000-deep", "5000-digit-id"])
@pytest.mark.parametrize("given", ["evaluate", "decontamination"])
def test_bad_question_contents(ws: Workspace, given: str, line: str, expected: str):
    questions = ws.write("questions.jsonl", '{"question": "Fine?"}\n' + line + "\n")
    if given == "evaluate":
        _check_case(ws, ["evaluate"], ["--config", str(ws.config()), "--questions", str(questions)], [f"{questions}:2: {expected}"])
    else:
        config = ws.config(generation={"decontamination": {"question_files": [str(questions)]}})
        _check_case(ws, ["run"], ["--config", str(config)], [f"question_files: {questions}:2: {expected}"])


def test_a_surrogate_pair_is_a_character(ws: Workspace):
    seeds = ws.write("seeds.jsonl", _jsonl(*GOOD_SEEDS) + b'{"instruction": "Smile \\ud83d\\ude00 please."}\n')
    result = _invoke(["plan", "--config", str(ws.config(seed_data=str(seeds))), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["seeds"] == 5


def _config_text(ws: Workspace, extra: str) -> Path:
    return ws.write("run.yaml", ws.config().read_text(encoding="utf-8") + extra)


CONFIG_CONTENTS = {
    "yaml-nested-100000-deep": ("extra: " + "[" * DEEP + "]" * DEEP + "\n", ["{path}:", "nested deeper than 64 levels"]),
    "5000-digit-integer": ("iterations: " + HUGE + "\n", ["{path}:", "the integer 999999999999...9999 (5000 characters)"]),
    "lone-surrogate-in-a-value": ('roles:\n  teacher:\n    system_prompt: "x\\ud800"\n', ["{path}:", "lone surrogate"]),
    "lone-surrogate-in-a-key": ('"\\ud800": 1\n', ["{path}:", "lone surrogate"]),
    "recursive-alias": ("extra: &a [*a]\n", ["{path}:", "recursive structure"]),
    "alias-bomb": (
        "bomb0: &b0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(f"bomb{k}: &b{k} [{', '.join([f'*b{k - 1}'] * 10)}]\n" for k in range(1, 8)),
        ["{path}:", "aliases expand the document to more than 1,000,000 values"],
    ),
    "bad-date": ("extra: 2024-13-45\n", ["{path}: cannot read a value"]),
}


@pytest.mark.parametrize("extra, expected", list(CONFIG_CONTENTS.values()), ids=list(CONFIG_CONTENTS))
def test_bad_config_contents(ws: Workspace, extra: str, expected: list[str]):
    config = _config_text(ws, extra)
    _check_case(ws, ["run"], ["--config", str(config)], [part.format(path=config) for part in expected])


def test_the_same_contents_in_an_included_file_name_that_file(ws: Workspace):
    ws.config("base.yaml")
    part = ws.write("part.yaml", "seed: " + HUGE + "\n")
    top = ws.write("top.yaml", "include: [base.yaml, part.yaml]\n")
    _check_case(ws, ["config"], ["--config", str(top)], [f"{part}:1: the integer"])


def test_a_5000_digit_set_value(ws: Workspace):
    _check_case(ws, ["config"], ["--config", str(ws.config()), "--set", f"seed={HUGE}"], ["--set seed: the integer"])


def test_a_config_file_over_its_size_cap(ws: Workspace):
    config = _config_text(ws, "#" * CONFIG_FILE.max_bytes + "\n")
    _check_case(ws, ["config"], ["--config", str(config)], [f"{config}: cannot read config file: larger than the"])


# ----------------------------------------------------------------------------------------------
# 2. Config values
# ----------------------------------------------------------------------------------------------

CONFIG_VALUES = {
    "tau-nan": ("discrimination.tau=.nan", "key 'discrimination.tau': Input should be a finite number"),
    "tau-inf": ("discrimination.tau=-.inf", "key 'discrimination.tau': Input should be a finite number"),
    "attempts-factor-inf": ("generation.max_attempts_factor=.inf", "key 'generation.max_attempts_factor'"),
    "attempts-factor-huge": ("generation.max_attempts_factor=1.0e300", "less than or equal to 1000"),
    "length-budget-inf": ("roles.generator.length_budget_factor=.inf", "key 'roles.generator.length_budget_factor'"),
    "timeout-nan": ("servers.teacher.startup_timeout_s=.nan", "key 'servers.teacher.startup_timeout_s'"),
    "gpu-share-nan": ("servers.teacher.vllm.gpu_memory_utilization=.nan", "servers.teacher.vllm.gpu_memory_utilization"),
    "seed-negative": ("seed=-1", "key 'seed': Input should be greater than or equal to 0"),
    "seed-beyond-32-bits": ("seed=4294967296", "key 'seed': Input should be less than or equal to 4294967295"),
    "tiny-seed-negative": ("tiny_models.seed=-1", "key 'tiny_models.seed'"),
    "run-dir-empty": ("run_dir=", "key 'run_dir': String should have at least 1 character"),
    "seed-data-empty": ("seed_data=''", "key 'seed_data': String should have at least 1 character"),
    "questions-empty": ("evaluation.questions=", "key 'evaluation.questions'"),
    "port-zero": ("servers.teacher.port=0", "key 'servers.teacher.port'"),
    "port-beyond-65535": ("servers.teacher.port=65536", "key 'servers.teacher.port'"),
    "rendezvous-port-zero": ("imitation.rendezvous_port=0", "key 'imitation.rendezvous_port'"),
    "iterations-beyond-1000": ("iterations=1001", "key 'iterations': Input should be less than or equal to 1000"),
    "new-per-iteration-huge": ("generation.new_per_iteration=4611686018427387904", "key 'generation.new_per_iteration'"),
    "seed-limit-huge": ("seed_limit=4611686018427387904", "key 'seed_limit'"),
}


@pytest.mark.parametrize("command", [("run",), ("plan",)], ids=" ".join)
@pytest.mark.parametrize("override, expected", list(CONFIG_VALUES.values()), ids=list(CONFIG_VALUES))
def test_bad_config_values(ws: Workspace, command, override: str, expected: str):
    _check_case(ws, list(command), ["--config", str(ws.config()), "--set", override], ["--set: ", expected])


def test_two_servers_on_one_port_name_both_keys(ws: Workspace):
    config = ws.config(servers__teacher__port=8123, servers__student__port=8123)
    _check_case(ws, ["run"], ["--config", str(config)], [
        f"{config}: servers.student.port: 8123 is servers.teacher.port too", "give each server its own port",
    ])
    wildcard = ws.config("wildcard.yaml", servers__teacher__port=8123, servers__student__port=8123,
                         servers__student__host="0.0.0.0", servers__student__allow_open_server=True)
    _check_case(ws, ["config"], ["--config", str(wildcard)], ["servers.student.port: 8123 is servers.teacher.port too"])


def test_two_ports_on_different_hosts_or_unset_are_fine(ws: Workspace):
    for config in (
        ws.config(servers__teacher__port=8123, servers__student__port=8124),
        ws.config("hosts.yaml", servers__teacher__port=8123, servers__student__port=8123,
                  servers__student__host="10.1.2.3", servers__student__allow_open_server=True),
    ):
        result = _invoke(["config", "--config", str(config)])
        assert result.exit_code == 0, result.stderr


def test_plan_never_overflows_on_a_budget_factor(ws: Workspace):
    """`.inf` once gave an OverflowError in `lion-local plan`; the biggest value allowed plans."""
    result = _invoke(["plan", "--config", str(ws.config()), "--set", "generation.max_attempts_factor=1000"])
    assert result.exit_code == 0, result.stderr


# ----------------------------------------------------------------------------------------------
# 3. imitation.trainer through the command line (the unit cases: tests/test_trainer_settings.py)
# ----------------------------------------------------------------------------------------------

TRAINER_VALUES = {
    "epochs-negative": ("num_train_epochs=-1", "imitation.trainer.num_train_epochs: must be > 0"),
    "batch-size-zero": ("per_device_train_batch_size=0", "imitation.trainer.per_device_train_batch_size: must be >= 1"),
    "learning-rate-nan": ("learning_rate=.nan", "imitation.trainer.learning_rate: must be a finite number"),
    "learning-rate-zero": ("learning_rate=0", "imitation.trainer.learning_rate: must be > 0"),
    "max-length-zero": ("max_length=0", "imitation.trainer.max_length: must be >= 1"),
    "batch-size-a-string": ("per_device_train_batch_size=four", "imitation.trainer.per_device_train_batch_size: expects a "
                            "number, got the string 'four'"),
    "batch-size-a-float": ("per_device_train_batch_size=4.5", "imitation.trainer.per_device_train_batch_size: expects an "
                           "integer, got float 4.5"),
    "bf16-a-number": ("bf16=3", "imitation.trainer.bf16: expects true or false"),
    "scheduler-unknown": ("lr_scheduler_type=cosin", "imitation.trainer.lr_scheduler_type: must be one of"),
    "warmup-negative": ("warmup_steps=-0.1", "imitation.trainer.warmup_steps: must be >= 0"),
    "weight-decay-inf": ("weight_decay=.inf", "imitation.trainer.weight_decay: must be a finite number"),
    "save-steps-zero": ("save_steps=0", "imitation.trainer.save_steps: must be > 0"),
    "logging-steps-negative": ("logging_steps=-5", "imitation.trainer.logging_steps: must be > 0"),
}


@pytest.mark.parametrize("setting, expected", list(TRAINER_VALUES.values()), ids=list(TRAINER_VALUES))
def test_bad_trainer_settings(ws: Workspace, setting: str, expected: str):
    args = ["--config", str(ws.config()), "--set", f"imitation.trainer.{setting}"]
    _check_case(ws, ["run"], args, [f"--set: {expected}"])


def test_a_trainer_setting_in_the_file_names_the_file(ws: Workspace):
    config = ws.config(imitation={"trainer": {"num_train_epochs": -1}})
    _check_case(ws, ["stage", "imitation"], ["--config", str(config)], [f"{config}: imitation.trainer.num_train_epochs"])


# ----------------------------------------------------------------------------------------------
# 4. No seed instruction
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("run",), ("iteration",), ("plan",)], ids=" ".join)
@pytest.mark.parametrize("content, expected", [
    ("[]", "the seed data file holds no instructions"),
    ("[\n]\n", "the seed data file holds no instructions"),
    ("\n\n  \n", "the seed data file is empty"),
], ids=["empty-list", "empty-list-on-lines", "blank-lines"])
def test_a_seed_file_without_instructions(ws: Workspace, command, content: str, expected: str):
    seeds = ws.write("none.json", content)
    _run_with_seeds(ws, seeds, [f"{seeds}: {expected}"], command)


# ----------------------------------------------------------------------------------------------
# 5. Model directories
# ----------------------------------------------------------------------------------------------


def _model_case(ws: Workspace, make) -> tuple[Path, list[str]]:
    model = ws.root / "models" / "broken"
    model.mkdir(parents=True)
    return model, make(model)


MODEL_CASES = {
    "empty-directory": lambda m: [f"{m}/config.json: model config not found"],
    "config-not-json": lambda m: ((m / "config.json").write_text("{nope"), [f"{m}/config.json:1: invalid JSON"])[1],
    "config-a-list": lambda m: ((m / "config.json").write_text("[]"), [f"{m}/config.json: no model_type"])[1],
    "no-model-type": lambda m: ((m / "config.json").write_text('{"hidden_size": 8}'), ["no model_type"])[1],
    "config-a-fifo": lambda m: (os.mkfifo(m / "config.json"), [f"{m}/config.json: cannot read model config: it is a FIFO"])[1],
    "no-weights": lambda m: ((m / "config.json").write_text('{"model_type": "llama"}'), [f"{m} holds no weights"])[1],
}


@pytest.mark.parametrize("command", [("run",), ("serve", "teacher")], ids=" ".join)
@pytest.mark.parametrize("make", list(MODEL_CASES.values()), ids=list(MODEL_CASES))
def test_a_model_directory_without_a_loadable_model(ws: Workspace, command, make):
    model, expected = _model_case(ws, make)
    config = ws.config(servers__teacher__model=str(model))
    _check_case(ws, list(command), ["--config", str(config)], ["servers.teacher.model: ", *expected,
                                                                "set it to a local model directory"])


@pytest.mark.parametrize("weights", [
    ["pytorch_model.bin"],
    ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"],
    ["pytorch_model.bin.index.json"],
])
def test_every_weight_layout_is_a_model(ws: Workspace, weights: list[str]):
    from lion_local.config import load_config
    from lion_local.endpoints.access import check_models_exist

    model = ws.root / "models" / "other"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    for name in weights:
        (model / name).write_bytes(b"")
    check_models_exist(load_config(ws.config(servers__teacher__model=str(model))), ["teacher"])


def test_tiny_models_may_still_be_built_later(ws: Workspace):
    from lion_local.config import load_config
    from lion_local.endpoints.access import check_models_exist

    tiny = ws.root / "tiny"
    config = load_config(ws.config(tiny_models={"dir": str(tiny)}, servers__teacher__model=str(tiny / "teacher")))
    check_models_exist(config, ["teacher", "student"])  # absent under tiny_models.dir: built on first use


# ----------------------------------------------------------------------------------------------
# 6. Options of the command line
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, expected", [
    (["--generator-acceptance", "nan"], "'--generator-acceptance': 'nan' is not a finite number"),
    (["--generator-acceptance", "-nan"], "'--generator-acceptance': '-nan' is not a finite number"),
    (["--generator-acceptance", "inf"], "'--generator-acceptance': inf is not in the range 0<x<=1"),
    (["--generator-acceptance", "0"], "'--generator-acceptance': 0.0 is not in the range 0<x<=1"),
    (["--seeds", "0"], "'--seeds': 0 is not in the range"),
    (["--seeds", "4611686018427387904"], "'--seeds': 4611686018427387904 is not in the range"),
], ids=["nan", "minus-nan", "inf", "zero", "seeds-zero", "seeds-huge"])
def test_plan_options(ws: Workspace, option: list[str], expected: str):
    _check_case(ws, ["plan"], ["--config", str(ws.config()), *option], [expected])


@pytest.mark.parametrize("option, expected", [
    (["--seed", "-1"], "'--seed': -1 is not in the range 0<=x<=4294967295"),
    (["--seed", "4294967296"], "'--seed': 4294967296 is not in the range"),
    (["--steps", "0"], "'--steps': 0 is not in the range x>=1"),
], ids=["seed-negative", "seed-beyond-32-bits", "steps-zero"])
def test_make_tiny_number_options(ws: Workspace, option: list[str], expected: str):
    out = ws.root / "tiny-out"
    line = _assert_one_line_error(_invoke(["make-tiny", "--out", str(out), *option]), [expected])
    assert "Traceback" not in line


# ----------------------------------------------------------------------------------------------
# 7. make-tiny --out where no folder can be written
# ----------------------------------------------------------------------------------------------


def test_make_tiny_out_below_a_file(ws: Workspace):
    blocker = ws.write("a-file", b"x")
    before = _snapshot(ws.root)
    _assert_one_line_error(_invoke(["make-tiny", "--out", str(blocker / "tiny")]), [f"{blocker}: a file, not a folder"])
    _assert_one_line_error(_invoke(["make-tiny", "--out", str(blocker)]), [f"{blocker}: a file, not a folder"])
    assert _snapshot(ws.root) == before


def test_make_tiny_over_existing_models_without_force_is_one_line(ws: Workspace):
    (ws.root / "tiny-out" / "teacher").mkdir(parents=True)
    before = _snapshot(ws.root)
    _assert_one_line_error(_invoke(["make-tiny", "--out", str(ws.root / "tiny-out")]), ["already exist(s); pass --force"])
    assert _snapshot(ws.root) == before


def test_make_tiny_out_in_a_place_no_folder_can_be_made(ws: Workspace):
    _assert_one_line_error(_invoke(["make-tiny", "--out", "/proc/lion-local-tiny"]), ["/proc/lion-local-tiny: no folder"])


def test_make_tiny_out_in_a_read_only_folder(ws: Workspace):
    locked = ws.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip(f"uid {os.getuid()} writes into a mode-555 folder (root): no read-only folder to test with")
        result = CliRunner().invoke(main, ["make-tiny", "--out", str(locked / "tiny")])
        assert result.exit_code == 1, result.output  # the file system refused: exit 1 (lion_local.errors)
        assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, result.stderr
        assert not (locked / "tiny").exists()
    finally:
        locked.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# imitation.accelerate_config: read by the training process, checked before the run starts
# ----------------------------------------------------------------------------------------------


def test_a_bad_accelerate_config(ws: Workspace):
    fifo = _fifo(ws, "accelerate.yaml")
    config = ws.config(imitation={"accelerate_config": str(fifo)})
    _check_case(ws, ["run"], ["--config", str(config)], [f"imitation.accelerate_config: {fifo}: cannot read accelerate config"])
    listed = ws.write("list.yaml", "- a\n- b\n")
    config = ws.config("listed.yaml", imitation={"accelerate_config": str(listed)})
    _check_case(ws, ["run"], ["--config", str(config)], [f"imitation.accelerate_config: {listed}: not a mapping"])
    missing = ws.root / "none.yaml"
    config = ws.config("missing.yaml", imitation={"accelerate_config": str(missing)})
    _check_case(ws, ["run"], ["--config", str(config)], [f"imitation.accelerate_config: {missing}: accelerate config file not found"])


def test_the_shipped_accelerate_configs_pass(ws: Workspace):
    from lion_local.config import check_accelerate_config, load_config

    for path in sorted((ROOT / "configs/accelerate").glob("*.yaml")):
        check_accelerate_config(load_config(ws.config(imitation={"accelerate_config": str(path)})))
