"""Command lines and environments of the servers lion-local starts; how a started server's death is
reported (a plain Python process stands in for the server); how ServerSet replaces a server
that died between stages (a stand-in for starting one); serving/ imports nothing from lion_local."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import serving
import lion_local.endpoints.servers
from lion_local.config import ConfigError, load_config
from lion_local.offline import OFFLINE_ENVIRONMENT, offline_environ
from lion_local.endpoints.servers import ServerSet
from serving import server_launch
from serving.commands import request_model_name, server_environment, transformers_command, vllm_command
from serving.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def test_vllm_command_line_has_every_configured_flag():
    config = load_config(
        ROOT / "configs/lion-7b.yaml",
        ["servers.teacher.model=/models/teacher-70b", "servers.teacher.vllm.extra_args=[--enable-chunked-prefill]"],
    )
    command = vllm_command(config.servers["teacher"], "0.0.0.0", 8123)
    assert Path(command[0]).name == "vllm"
    assert command[1:] == [
        "serve", "--model", "/models/teacher-70b",
        "--host", "0.0.0.0", "--port", "8123",
        "--served-model-name", "teacher",
        "--tensor-parallel-size", "4",
        "--data-parallel-size", "1",
        "--gpu-memory-utilization", "0.9",
        "--dtype", "auto",
        "--generation-config", "vllm",
        "--max-model-len", "8192",
        "--enable-chunked-prefill",
    ]


def test_vllm_served_name_defaults_to_the_model_directory_name():
    config = load_config(ROOT / "configs/lion-7b.yaml", ["servers.student.served_model_name=null"])
    command = vllm_command(config.servers["student"], "127.0.0.1", 9000, model="/runs/x/iter_2/student")
    assert command[command.index("--served-model-name") + 1] == "student"
    assert command[command.index("--model") + 1] == "/runs/x/iter_2/student"
    assert request_model_name(config.servers["student"], "/runs/x/iter_2/student") == "student"


def test_api_key_reaches_vllm_only_through_its_environment(monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-abc-123")
    config = load_config(ROOT / "configs/lion-7b.yaml", ["servers.teacher.api_key_env=TEACHER_KEY"])
    launch = server_launch(config.servers["teacher"], "sk-abc-123")
    assert "sk-abc-123" not in " ".join(launch.command)
    assert "--api-key" not in launch.command
    assert launch.environment["VLLM_API_KEY"] == "sk-abc-123"
    assert "sk-abc-123" not in repr(launch)
    assert int(launch.environment["VLLM_PORT"]) != launch.port


def test_every_started_server_gets_the_offline_environment():
    config = load_config(ROOT / "configs/tiny-cpu.yaml")
    for name in ("teacher", "student"):
        environment = lion_local.endpoints.servers.wanted_server(config, name, Path("unused.log")).environment
        for key, value in OFFLINE_ENVIRONMENT.items():
            assert environment[key] == value
    assert set(OFFLINE_ENVIRONMENT) >= {
        "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
        "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "WANDB_MODE",
    }


def test_cpu_vllm_servers_get_disjoint_cores_and_a_bounded_kv_cache():
    config = load_config(ROOT / "configs/tiny-cpu.yaml")
    teacher, student = (server_environment(config.servers[name], None, None, {}) for name in ("teacher", "student"))
    assert teacher["VLLM_CPU_OMP_THREADS_BIND"] == "0" and student["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert teacher["VLLM_CPU_KVCACHE_SPACE"] == "1"
    command = vllm_command(config.servers["teacher"], "127.0.0.1", 8000)
    assert command[:3] == [str(ROOT / ".venv-vllm/bin/python"), "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in command
    # The model in the engine's process: the flag and the variable without which the CPU backend ignores it.
    assert command[command.index("--distributed-executor-backend") + 1] == "uni"
    assert teacher["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" == student["VLLM_ENABLE_V1_MULTIPROCESSING"]
    gpu = load_config(ROOT / "configs/lion-7b.yaml").servers["teacher"]
    assert "--distributed-executor-backend" not in vllm_command(gpu, "127.0.0.1", 8000)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in server_environment(gpu, None, None, {})


def test_an_in_process_cpu_worker_is_one_replica_on_one_device():
    with pytest.raises(ConfigError, match="cpu_worker_in_process runs one replica on one device"):
        load_config(ROOT / "configs/tiny-cpu.yaml", ["servers.teacher.vllm.tensor_parallel_size=2"])


def test_transformers_command_serves_the_pinned_local_model():
    config = load_config(ROOT / "configs/tiny-cpu-transformers.yaml")
    server = config.servers["teacher"]
    command = transformers_command(server, "127.0.0.1", 8555)
    assert Path(command[0]).name == "transformers"
    assert command[1:] == [
        "serve", server.model, "--host", "127.0.0.1", "--port", "8555", "--device", "cpu", "--dtype", "auto",
        "--log-level", "info",
    ]
    # transformers serve rejects requests naming another model than the one it preloads.
    assert request_model_name(server) == server.model


def test_launch_picks_a_free_port_and_builds_the_urls():
    config = load_config(ROOT / "configs/tiny-cpu.yaml")
    launch = server_launch(config.servers["teacher"], None)
    assert launch.base_url == f"http://127.0.0.1:{launch.port}/v1"
    assert launch.health_url == f"http://127.0.0.1:{launch.port}/health"
    fixed = server_launch(load_config(ROOT / "configs/tiny-cpu.yaml", ["servers.teacher.port=8999"]).servers["teacher"], None)
    assert fixed.port == 8999


def test_external_endpoint_uses_its_served_model_name():
    config = load_config(ROOT / "configs/tiny-cpu.yaml", [
        "servers.teacher.engine=external", "servers.teacher.base_urls=[http://a:1/v1, http://b:2/v1]",
        "servers.teacher.served_model_name=big-teacher",
    ])
    assert request_model_name(config.servers["teacher"]) == "big-teacher"
    with pytest.raises(ValueError, match="not started by lion-local"):
        server_launch(config.servers["teacher"], None)


def test_exit_report_says_how_a_started_server_died_and_where_its_log_is(tmp_path):
    log = tmp_path / "server-student.log"
    script = "import sys, time; print('loading weights', flush=True); time.sleep(600)"
    process = ServerProcess("student", [sys.executable, "-c", script], dict(os.environ), log, "http://127.0.0.1:9/health", 30)
    process.start()
    try:
        assert process.exit_report() is None
        deadline = time.monotonic() + 10
        # The log's first line (the command) holds the text too: wait for the server's own line.
        while "\nloading weights" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        server = process.server_pid()  # the process under the supervisor
        assert server is not None and server != process.process.pid
        os.kill(server, signal.SIGKILL)
        process.process.wait(timeout=10)  # the supervisor ends as its server did
        report = process.exit_report()
    finally:
        process.stop()
    assert report.startswith(f"the student server (pid {server}) was killed by SIGKILL while in use")
    assert "loading weights" in report and str(log) in report and "\n" not in report


def test_a_server_found_dead_between_stages_is_started_again(monkeypatch, caplog):
    """ServerSet keeps servers across stages; one that died meanwhile is replaced, with a warning."""
    config = load_config(ROOT / "configs/tiny-cpu.yaml")
    dead: set[int] = set()
    starts: list[str] = []

    def fake_launch_servers(wanted, track=None):
        return [(each, None, None) for each in wanted]

    async def fake_await_servers(launched):
        started = []
        for each, _, _ in launched:
            number = len(starts)
            starts.append(each.name)
            report = f"the {each.name} server (pid {number}) was killed by SIGKILL while in use"
            endpoint = serving.Endpoint(
                each.name, [f"http://127.0.0.1:{number + 1}/v1"], "m", None,
                lambda report=report, number=number: report if number in dead else None,
            )
            started.append((None, endpoint))
        return started

    monkeypatch.setattr(lion_local.endpoints.servers, "launch_servers", fake_launch_servers)
    monkeypatch.setattr(lion_local.endpoints.servers, "await_servers_async", fake_await_servers)

    async def across_stages() -> None:
        async with ServerSet(config, ROOT / "unused-log-dir") as servers:
            first = await servers.endpoint("teacher")
            assert await servers.endpoint("teacher") is first  # alive: reused
            dead.add(0)
            second = await servers.endpoint("teacher")  # dead by now: started again
            assert starts == ["teacher", "teacher"] and second.base_urls == ["http://127.0.0.1:2/v1"]

    with caplog.at_level("WARNING", logger="lion_local"):
        asyncio.run(across_stages())
    assert [r.getMessage() for r in caplog.records] == [
        "the teacher server (pid 0) was killed by SIGKILL while in use; starting it again"
    ]


def test_serving_imports_nothing_from_lion_local():
    """The dependency points one way: lion_local uses serving, never the reverse."""
    import ast

    for path in sorted((ROOT / "serving").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] != "lion_local", f"{path.name}:{node.lineno} imports {name}"


def test_a_server_command_that_does_not_exist_is_named_before_anything_starts():
    from lion_local.config import ConfigError
    from lion_local.endpoints.access import check_launchers

    config = load_config(ROOT / "configs/tiny-cpu.yaml", ["servers.teacher.vllm.launcher=[/nowhere/bin/vllm, serve]"])
    with pytest.raises(ConfigError, match=r"^servers.teacher.vllm.launcher: /nowhere/bin/vllm is not an executable"):
        check_launchers(config, ["teacher"])


def test_loading_servers_that_ignore_sigterm_are_stopped_side_by_side_after_a_short_grace(tmp_path):
    """A vLLM API server still loading may ignore SIGTERM: a server that never answered /health gets
    serving.process.LOADING_GRACE_S, not its stop_grace_s (30 s here), then SIGUSR1 has its supervisor
    kill the group at once; two such servers are stopped side by side, in one grace."""
    from serving.process import LOADING_GRACE_S, stop_processes

    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('loading', flush=True); time.sleep(600)"
    servers = [
        ServerProcess(name, [sys.executable, "-c", script], dict(os.environ), tmp_path / f"{name}.log",
                      "http://127.0.0.1:9/health", 30, stop_grace_s=30.0)
        for name in ("teacher", "student")
    ]
    for server in servers:
        server.start()
    deadline = time.monotonic() + 20
    while not all("\nloading" in server.log_path.read_text() for server in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    loading = [server.server_pid() for server in servers]
    assert None not in loading
    started = time.monotonic()
    stop_processes(servers)
    seconds = time.monotonic() - started
    # Well short of the 30 s stop grace both ignore (a margin for a host three times slower), and not before
    # the short grace ran out.
    assert LOADING_GRACE_S - 0.5 < seconds < 18.0, seconds
    for pid in loading:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert [server.process.returncode for server in servers] == [-signal.SIGKILL] * 2
