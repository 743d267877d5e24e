"""Config loading, validation and the one-line errors every command gives for a bad config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.config import Config, ConfigError, load_config
from lion_local.endpoints.access import api_key_for, check_models_exist

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A copy of configs/tiny-cpu.yaml whose relative paths point into tmp_path."""
    data = yaml.safe_load((CONFIGS / "tiny-cpu.yaml").read_text())
    data["run_dir"] = str(tmp_path / "run")
    data["seed_data"] = str(ROOT / "lion_local/data/smoke_seed.jsonl")
    data["tiny_models"]["dir"] = str(tmp_path / "models/tiny")
    data["servers"]["teacher"]["model"] = str(tmp_path / "models/tiny/teacher")
    data["servers"]["student"]["model"] = str(tmp_path / "models/tiny/student")
    return _write(tmp_path / "tiny.yaml", yaml.safe_dump(data))


# ----------------------------------------------------------------------------------------------
# Every file under configs/
# ----------------------------------------------------------------------------------------------


def test_configs_directory_has_the_required_files():
    names = {str(path.relative_to(CONFIGS)) for path in ALL_YAML}
    assert {"tiny-cpu.yaml", "lion-7b.yaml"} <= names
    teachers = [path for path in ALL_YAML if path.parent.name == "teachers"]
    engines = [yaml.safe_load(path.read_text())["servers"]["teacher"]["engine"] for path in teachers]
    assert engines.count("vllm") >= 3 and engines.count("external") >= 1
    assert {"fsdp.yaml", "deepspeed-zero3.yaml"} <= {p.name for p in ALL_YAML if p.parent.name == "accelerate"}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_starts_with_the_command_that_uses_it(path: Path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path} must start with a comment"
    assert any(word in "\n".join(header) for word in ("lion-local ", "make ", "sbatch ", "accelerate launch")), header


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_validates(path: Path, tmp_path: Path):
    if path.parent.name == "accelerate":
        cluster = load_config_from_file(str(path))  # accelerate's own loader rejects unknown keys
        assert cluster.distributed_type.value in ("FSDP", "DEEPSPEED", "MULTI_GPU")
        # MULTI_GPU only as cpu-ddp.yaml: accelerate's way to start several CPU processes (with torchrun)
        assert cluster.distributed_type.value != "MULTI_GPU" or (cluster.use_cpu and path.name == "cpu-ddp.yaml")
    elif path.parent.name == "teachers":
        # A preset is a fragment: validate it the way it is used, included into the 7B run config.
        combined = _write(tmp_path / "combined.yaml", f"include: [{CONFIGS / 'lion-7b.yaml'}, {path}]\n")
        config = load_config(combined)
        assert config.servers["teacher"] == load_config(combined).servers["teacher"]
        assert config.server_for("referee") is config.server_for("teacher")
    else:
        assert isinstance(load_config(path), Config)


def test_lion_7b_has_the_paper_settings():
    config = load_config(CONFIGS / "lion-7b.yaml")
    assert config.iterations == 3
    assert config.discrimination.tau == 1.0
    assert config.generation.new_per_iteration == 6000
    assert config.generation.hard_ratio == 0.5
    assert config.generation.rouge_threshold == 0.7
    sft = config.imitation.trainer
    assert (sft["learning_rate"], sft["num_train_epochs"], sft["max_length"]) == (2e-5, 3, 1024)
    assert (sft["per_device_train_batch_size"], config.imitation.effective_batch_size) == (4, 128)
    assert (sft["lr_scheduler_type"], sft["warmup_steps"], sft["weight_decay"], sft["bf16"]) == ("cosine", 0.03, 0.0, True)
    roles = config.roles
    assert (roles.teacher.temperature, roles.referee.temperature, roles.generator.temperature) == (0.7, 0.2, 1.0)
    assert (roles.student.temperature, roles.student.max_tokens) == (0.7, 1024)
    assert config.servers["teacher"].engine == "vllm"


# ----------------------------------------------------------------------------------------------
# Errors: one line, naming the key and where it came from
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("generation.new_per_iteraton=5", "unknown key 'generation.new_per_iteraton' (did you mean 'generation.new_per_iteration'?)"),
        ("discrimination.tua=1", "did you mean 'discrimination.tau'?"),
        ("servers.teacher.api_key=abc", "did you mean 'servers.teacher.api_key_env'?"),
        ("servers.teacher.vllm.tensor_parallel=2", "did you mean 'servers.teacher.vllm.tensor_parallel_size'?"),
        ("generation.new_per_iteration=many", "key 'generation.new_per_iteration': Input should be a valid integer"),
        ("generation.new_per_iteration=0", "key 'generation.new_per_iteration': Input should be greater than or equal to 1"),
        ("generation.hard_ratio=1.5", "key 'generation.hard_ratio': Input should be less than or equal to 1"),
        ("generation.rouge_threshold=0", "key 'generation.rouge_threshold': Input should be greater than 0"),
        ("iterations=[1]", "key 'iterations': Input should be a valid integer"),
        ("roles.referee.server=teachr", "roles.referee.server: no server named 'teachr' (did you mean 'teacher'?)"),
        ("servers.student.engine=external", "servers.student"),
        ("roles.student.server=teacher", "roles.student.server: 'teacher' also serves the teacher, referee, generator"),
        ("servers.teacher.engine=gpu", "key 'servers.teacher.engine': Input should be 'vllm', 'transformers' or 'external'"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(override: str, expected: str):
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "tiny-cpu.yaml", [override])
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith("--set:") or override.startswith("servers.student.engine")


def test_error_names_the_file_that_set_the_key(tmp_path: Path):
    _write(tmp_path / "teachers/t.yaml", "# x\nservers:\n  teacher:\n    engine: vllm\n    modle: /m\n")
    top = _write(tmp_path / "run.yaml", "include: [teachers/t.yaml]\nrun_dir: r\nseed_data: s\nservers: {}\n")
    with pytest.raises(ConfigError, match=r"teachers/t.yaml: unknown key 'servers.teacher.modle' \(did you mean 'servers.teacher.model'\?\)"):
        load_config(top)


def test_missing_required_key(tmp_path: Path):
    top = _write(tmp_path / "run.yaml", "seed_data: s\nservers: {}\n")
    with pytest.raises(ConfigError, match="missing required key 'run_dir'"):
        load_config(top)


def test_yaml_syntax_error_names_the_line(tmp_path: Path):
    top = _write(tmp_path / "run.yaml", "run_dir: r\nservers:\n  teacher: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: YAML syntax error"):
        load_config(top)


def test_top_level_must_be_a_mapping(tmp_path: Path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path / "run.yaml", "- a\n- b\n"))


def test_include_cycle_and_missing_include(tmp_path: Path):
    _write(tmp_path / "a.yaml", "include: b.yaml\n")
    _write(tmp_path / "b.yaml", "include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "c.yaml", "include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml: config file not found \(included from .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")


def test_include_merges_and_later_files_win(tmp_path: Path):
    _write(tmp_path / "base.yaml", "run_dir: base\nseed_data: s\niterations: 5\nservers:\n  teacher: {engine: transformers, model: m, max_concurrency: 3}\n  student: {engine: transformers, model: m}\n")
    top = _write(tmp_path / "top.yaml", "include: base.yaml\niterations: 2\nservers:\n  teacher: {max_concurrency: 9}\n")
    config = load_config(top, ["seed=7"])
    assert (config.iterations, config.seed) == (2, 7)
    assert config.servers["teacher"].max_concurrency == 9
    assert config.servers["teacher"].engine == "transformers"  # merged, not replaced


def test_set_parses_yaml_values_and_creates_sections():
    config = load_config(
        CONFIGS / "tiny-cpu.yaml",
        ["generation.filters.banned_words=[foo, bar]", "imitation.trainer.bf16=true", "discrimination.tau=0.5"],
    )
    assert config.generation.filters.banned_words == ["foo", "bar"]
    assert config.imitation.trainer["bf16"] is True and config.discrimination.tau == 0.5
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(CONFIGS / "tiny-cpu.yaml", ["iterations"])


def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / "tiny-cpu.yaml")
    assert config.run_dir == str(tmp_path / "runs/tiny-cpu")
    assert config.servers["teacher"].model == str(tmp_path / "models/tiny/teacher")


def test_api_key_comes_only_from_the_named_environment_variable(monkeypatch):
    config = load_config(CONFIGS / "tiny-cpu.yaml", ["servers.teacher.api_key_env=LION_TEST_KEY"])
    monkeypatch.delenv("LION_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="environment variable LION_TEST_KEY is not set"):
        api_key_for(config, "teacher")
    monkeypatch.setenv("LION_TEST_KEY", "sk-test-123")
    assert api_key_for(config, "teacher") == "sk-test-123"
    assert api_key_for(config, "student") is None


def test_missing_model_directory_is_reported_but_tiny_models_may_be_built(tmp_path: Path):
    config = load_config(CONFIGS / "tiny-cpu.yaml", [f"tiny_models.dir={tmp_path}/tiny", f"servers.teacher.model={tmp_path}/tiny/teacher"])
    check_models_exist(config, ["teacher"])  # under tiny_models.dir: built on first use
    config = load_config(CONFIGS / "tiny-cpu.yaml", [f"servers.teacher.model={tmp_path}/nowhere"])
    with pytest.raises(ConfigError, match=r"servers.teacher.model: .*nowhere does not exist"):
        check_models_exist(config, ["teacher"])


# ----------------------------------------------------------------------------------------------
# Every command: exit code 2, one line, nothing created on disk
# ----------------------------------------------------------------------------------------------

COMMANDS_WITH_CONFIG = [
    ["config"],
    ["doctor"],
    ["serve", "teacher"],
    ["serve", "teacher", "--dry-run"],
    ["run"],
    ["iteration"],
    ["stage", "imitation"],
    ["status"],
    ["report"],
    ["plan"],
    ["evaluate"],
]
RUN_COMMANDS = [["run"], ["iteration"], ["stage", "imitation"]]


def _snapshot(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


@pytest.mark.parametrize("command", COMMANDS_WITH_CONFIG, ids=" ".join)
@pytest.mark.parametrize(
    ("override", "key"),
    [("generation.new_per_iteraton=5", "generation.new_per_iteraton"), ("iterations=abc", "iterations")],
)
def test_every_command_rejects_a_bad_config_with_exit_2(command, override, key, tiny_config: Path, tmp_path: Path):
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(main, [*command, "--config", str(tiny_config), "--set", override])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0] and lines[0].startswith("error: ")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command", [["doctor"], ["serve", "teacher"], *RUN_COMMANDS], ids=" ".join)
def test_commands_needing_the_model_reject_a_missing_path(command, tiny_config: Path, tmp_path: Path):
    before = _snapshot(tmp_path)
    missing = tmp_path / "no-such-model"
    result = CliRunner().invoke(main, [*command, "--config", str(tiny_config), "--set", f"servers.teacher.model={missing}"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: servers.teacher.model: {missing} does not exist; set it to a local model directory "
        f"(nothing is downloaded), e.g. --set servers.teacher.model=/path/to/model"
    ]
    assert _snapshot(tmp_path) == before


def test_config_only_commands_work_without_the_model(tiny_config: Path, tmp_path: Path):
    missing = tmp_path / "no-such-model"
    for command in (["config"], ["serve", "teacher", "--dry-run"]):
        result = CliRunner().invoke(main, [*command, "--config", str(tiny_config), "--set", f"servers.teacher.model={missing}"])
        assert result.exit_code == 0, result.output
    assert not missing.exists() and not (tmp_path / "run").exists()


def test_real_process_exit_code_and_stderr(tiny_config: Path, tmp_path: Path):
    completed = subprocess.run(
        [sys.executable, "-m", "lion_local", "config", "--config", str(tiny_config), "--set", "discrimination.tua=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.strip() == "error: --set: unknown key 'discrimination.tua' (did you mean 'discrimination.tau'?)"


def test_dry_run_prints_the_command_and_never_the_key(tiny_config: Path, monkeypatch):
    monkeypatch.setenv("LION_TEST_KEY", "sk-secret-value-42")
    result = CliRunner().invoke(
        main,
        ["serve", "teacher", "--dry-run", "--config", str(CONFIGS / "lion-7b.yaml"), "--set", "servers.teacher.api_key_env=LION_TEST_KEY"],
    )
    assert result.exit_code == 0, result.output
    assert "vllm serve" in result.output and "--generation-config vllm" in result.output
    assert "sk-secret-value-42" not in result.output and "$LION_TEST_KEY" in result.output


@pytest.mark.parametrize("command", [["doctor"], ["serve", "teacher"], *RUN_COMMANDS], ids=" ".join)
def test_unset_api_key_variable_is_rejected_before_anything_starts(command, tiny_config: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("LION_UNSET_KEY", raising=False)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(
        main, [*command, "--config", str(tiny_config), "--set", "servers.teacher.api_key_env=LION_UNSET_KEY"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: servers.teacher.api_key_env: environment variable LION_UNSET_KEY is not set; "
        "export LION_UNSET_KEY=<key> before running"
    ]
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=" ".join)
def test_run_commands_reject_a_bad_seed_file_before_creating_the_run(command, tiny_config: Path, tmp_path: Path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name a colour."}\n{"instruction": \n')
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(main, [*command, "--config", str(tiny_config), "--set", f"seed_data={seeds}"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {seeds}:2:"), lines
    assert _snapshot(tmp_path) == before


def test_status_of_a_run_not_started(tiny_config: Path, tmp_path: Path):
    result = CliRunner().invoke(main, ["status", "--config", str(tiny_config)])
    assert result.exit_code == 0, result.output
    assert "not started (7 stages to run)" in result.output
    assert not (tmp_path / "run").exists()
