"""Who may use a server lion-local starts (serving/access.py), without SLURM or model servers.

- The key rule: a vLLM server beyond loopback always requires a key (configured, else a random one
  per start); a service job's (`serve --publish`) always has one; `serve` in the foreground beyond
  loopback with no key, and `transformers serve` beyond loopback, are refused in one line unless
  allow_open_server, which is accepted with a warning.
- The key reaches vLLM in VLLM_API_KEY, never on its command line; `serve --dry-run` never shows it.
- Endpoint files: 0600 in a 0700 directory whatever the umask, a loose directory of this user's
  tightened by the writer; a reader refuses, in one line naming the file and what to do, files and
  directories others may read or write, and those of another user (made so with chown, as root).
The real service job, its 401, the iteration job and doctor using its key, and the search for the
key everywhere: tests/test_slurm.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.config import ConfigError, load_config
from lion_local.endpoints.access import check_access, endpoint_dir
from lion_local.endpoints.servers import wanted_server
from serving import server_launch
from serving.access import is_loopback, key_rule, server_key
from serving.process import ServerError
from serving.published import live_published_endpoints, published_endpoint, read_published

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str, path: str = "configs/tiny-cpu.yaml"):
    monkeypatch.chdir(ROOT)
    return load_config(path, [f"run_dir={tmp_path / 'run'}", *overrides])


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("making a file another user's needs root (make test runs the suite as root)")


# ----------------------------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------------------------


def test_loopback_addresses():
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "gpu-a01", "192.168.0.1"):
        assert not is_loopback(host), host


@pytest.mark.parametrize(
    ("engine", "host", "configured", "started_for", "rule"),
    [
        ("vllm", "127.0.0.1", False, "run", "open"),
        ("vllm", "0.0.0.0", False, "run", "generate"),
        ("vllm", "gpu-a01", False, "run", "generate"),
        ("vllm", "127.0.0.1", False, "service", "generate"),
        ("vllm", "0.0.0.0", False, "service", "generate"),
        ("vllm", "127.0.0.1", False, "foreground", "open"),
        ("vllm", "0.0.0.0", True, "foreground", "configured"),
        ("vllm", "0.0.0.0", True, "service", "configured"),
        ("transformers", "127.0.0.1", False, "service", "open"),
        ("transformers", "127.0.0.1", True, "run", "open"),  # it cannot require the key it is given
    ],
)
def test_key_rule(tmp_path, monkeypatch, engine, host, configured, started_for, rule):
    path = "configs/tiny-cpu.yaml" if engine == "vllm" else "configs/tiny-cpu-transformers.yaml"
    spec = _config(tmp_path, monkeypatch, f"servers.teacher.host={host}", path=path).servers["teacher"]
    assert key_rule("teacher", spec, configured, started_for) == rule


def test_an_external_server_keeps_its_configured_key_whatever_its_host(tmp_path, monkeypatch):
    spec = _config(tmp_path, monkeypatch, "servers.teacher.engine=external").servers["teacher"]
    assert key_rule("teacher", spec, True, "run") == "configured"
    assert key_rule("teacher", spec, False, "run") == "open"


def test_a_foreground_server_beyond_loopback_with_no_key_is_refused(tmp_path, monkeypatch):
    spec = _config(tmp_path, monkeypatch, "servers.teacher.host=0.0.0.0").servers["teacher"]
    with pytest.raises(ServerError) as refused:
        key_rule("teacher", spec, False, "foreground")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("servers.teacher.host: 0.0.0.0 binds beyond loopback")
    for fix in ("--publish", "servers.teacher.api_key_env", "servers.teacher.allow_open_server: true"):
        assert fix in message


@pytest.mark.parametrize("configured", [False, True])
def test_transformers_serve_beyond_loopback_is_refused_even_with_a_key(tmp_path, monkeypatch, configured):
    config = _config(tmp_path, monkeypatch, "servers.teacher.host=0.0.0.0", path="configs/tiny-cpu-transformers.yaml")
    with pytest.raises(ServerError, match=r"`transformers serve` cannot require an API key.*allow_open_server: true"):
        key_rule("teacher", config.servers["teacher"], configured, "service")
    with pytest.raises(ConfigError, match="servers.teacher.host: 0.0.0.0"):  # the runs' preflight
        check_access(config, "teacher")


def test_generated_keys_are_long_random_and_new_per_start(tmp_path, monkeypatch):
    spec = _config(tmp_path, monkeypatch, "servers.teacher.host=0.0.0.0").servers["teacher"]
    keys = {server_key("teacher", spec, None, "run") for _ in range(20)}
    assert len(keys) == 20 and all(len(key) >= 40 for key in keys)


def test_open_server_opt_in_is_accepted_with_a_warning(tmp_path, monkeypatch, caplog):
    config = _config(
        tmp_path, monkeypatch, "servers.teacher.host=0.0.0.0", "servers.teacher.allow_open_server=true",
        path="configs/tiny-cpu-transformers.yaml",
    )
    with caplog.at_level(logging.WARNING, logger="serving"):
        assert server_key("teacher", config.servers["teacher"], None, "service") is None
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert "allow_open_server" in warning.getMessage() and "anyone who can reach this node" in warning.getMessage()
    caplog.clear()
    loopback = _config(tmp_path, monkeypatch, "servers.teacher.allow_open_server=true").servers["teacher"]
    with caplog.at_level(logging.WARNING, logger="serving"):
        server_key("teacher", loopback, None, "run")
    assert not caplog.records  # nothing is opened on loopback


def test_a_run_started_server_beyond_loopback_gets_a_key_in_its_environment_only(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "servers.teacher.host=0.0.0.0")
    wanted = wanted_server(config, "teacher", tmp_path / "server.log")
    assert wanted.api_key
    launch = server_launch(wanted.spec, wanted.api_key, wanted.environment)
    assert launch.environment["VLLM_API_KEY"] == wanted.api_key
    assert not [word for word in launch.command if wanted.api_key in word]
    assert wanted.api_key not in repr(wanted) and wanted.api_key not in repr(launch)


# ----------------------------------------------------------------------------------------------
# `serve` from the command line
# ----------------------------------------------------------------------------------------------


def _serve(tmp_path: Path, config: str, *arguments: str):
    return CliRunner().invoke(
        main, ["serve", "teacher", "--dry-run", "--config", config, "--set", f"run_dir={tmp_path / 'run'}", *arguments]
    )


def test_serve_refuses_an_open_server_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for config, arguments in [
        ("configs/tiny-cpu.yaml", ["--host", "0.0.0.0"]),
        ("configs/tiny-cpu-transformers.yaml", ["--host", "0.0.0.0", "--publish"]),
    ]:
        result = _serve(tmp_path, config, *arguments)
        assert result.exit_code == 2, result.output
        [line] = result.output.strip().splitlines()
        assert line.startswith("error: servers.teacher.host: 0.0.0.0 binds beyond loopback"), line
    assert not (tmp_path / "run").exists()


def test_serve_publish_makes_a_key_and_never_shows_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = _serve(tmp_path, "configs/tiny-cpu.yaml", "--host", "0.0.0.0", "--publish")
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("(a random API key made at start, in the environment, published with the endpoint)")
    assert "VLLM_API_KEY" not in result.output and "--api-key" not in result.output


def test_serve_with_the_open_server_opt_in_warns_and_starts(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    with caplog.at_level(logging.WARNING, logger="serving"):
        result = _serve(
            tmp_path, "configs/tiny-cpu-transformers.yaml", "--host", "0.0.0.0", "--publish",
            "--set", "servers.teacher.allow_open_server=true",
        )
    assert result.exit_code == 0, result.output
    assert "transformers serve" in result.output and result.output.rstrip().endswith("(no API key)")
    assert any("allow_open_server" in record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)


# ----------------------------------------------------------------------------------------------
# Endpoint files
# ----------------------------------------------------------------------------------------------


def _published(directory: Path, key: str | None = "the-key"):
    return published_endpoint("teacher", directory, "http://node-a:8000/v1", "teacher", key)


@pytest.mark.parametrize("umask", [0o000, 0o277], ids=["umask-0000", "umask-0277"])
def test_endpoint_files_are_private_whatever_the_umask(tmp_path, umask):
    directory = tmp_path / "run" / "endpoints" / "teacher"
    old = os.umask(umask)
    try:
        with _published(directory) as path:
            assert directory.stat().st_mode & 0o777 == 0o700
            assert path.stat().st_mode & 0o777 == 0o600
            assert json.loads(path.read_text())["api_key"] == "the-key"
            assert [record["api_key"] for record in read_published(directory)] == ["the-key"]
    finally:
        os.umask(old)


def test_the_writer_tightens_a_loose_directory_of_its_own(tmp_path, caplog):
    directory = tmp_path / "endpoints"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with caplog.at_level(logging.INFO, logger="serving"), _published(directory):
        assert directory.stat().st_mode & 0o777 == 0o700
    assert any("permissions set to 0700" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=oct)
def test_a_loose_endpoint_file_is_refused_in_one_line(tmp_path, mode):
    directory = tmp_path / "endpoints"
    with _published(directory) as path:
        path.chmod(mode)
        with pytest.raises(ServerError) as refused:
            read_published(directory)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"refusing endpoint file {path} has mode {mode:04o}, looser than 0600")
    assert "restart the service job" in message and "the-key" not in message


def test_a_loose_endpoint_directory_is_refused_in_one_line(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "servers.teacher.engine=external", "servers.teacher.startup_timeout_s=1")
    directory = endpoint_dir(config, "teacher")
    with _published(directory):
        directory.chmod(0o777)
        with pytest.raises(ServerError) as refused:
            live_published_endpoints("teacher", config.servers["teacher"], directory)
        directory.chmod(0o700)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"servers.teacher: refusing endpoint directory {directory} has mode 0777")
    assert f"chmod 700 {directory}" in message


def test_another_users_endpoint_file_is_refused(tmp_path):
    _needs_root()
    directory = tmp_path / "endpoints"
    with _published(directory) as path:
        os.chown(path, NOBODY, NOBODY)  # mode 0600 still: only the owner is wrong
        with pytest.raises(ServerError) as refused:
            read_published(directory)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"refusing endpoint file {path} belongs to ")
    assert f"uid {NOBODY}" in message and "not to you" in message


def test_another_users_endpoint_directory_is_refused_by_readers_and_writers(tmp_path):
    _needs_root()
    directory = tmp_path / "endpoints"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(ServerError, match=f"refusing endpoint directory {directory} belongs to .*uid {NOBODY}"):
        read_published(directory)
    with pytest.raises(ServerError, match=f"endpoint directory {directory} belongs to .*uid {NOBODY}"):
        with _published(directory):
            pass
    assert list(directory.iterdir()) == []

