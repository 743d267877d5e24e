"""Command lines, endpoint files and batch scripts of the SLURM mode, without SLURM daemons or GPUs.

Covered:
- serving.commands.vllm_command / server_launch: the exact `vllm serve` argument list for the
  lion-7b teacher (tensor and data parallel sizes, max model length, GPU memory utilization,
  served model name, `--generation-config vllm`, host, port), extra_args appended verbatim;
  server_environment: the API key only in VLLM_API_KEY (never on the command line), VLLM_PORT
  for the internal port, every offline variable.
- training_launch.multi_node_command: the exact srun + `bash -c` wrapper + `accelerate launch`
  argument list with and without an accelerate config file, the rendezvous port override, no
  --cpus-per-task when SLURM gave none, LaunchError without GPUs; the wrapper really executed
  by bash with a fake accelerate, proving SLURM_NODEID becomes --machine_rank and the other
  arguments arrive unchanged and in order.
- configs/accelerate/*.yaml read by accelerate: no rendezvous settings that would override the
  command line's, whole-model checkpoints, DeepSpeed's per-node torchrun launcher.
- training_launch.current_allocation: one node, the node list expanded by `scontrol show
  hostnames` (real or fake), SLURM_NNODES/SLURM_NODELIST fallbacks, LaunchError when the node
  list is missing, when scontrol fails and when scontrol is absent.
- serving.published: published_endpoint writes one JSON file (SLURM job id or "local" in its
  name; the key; 0600 in a 0700 directory) and removes it on exit and on error; read_published
  skips malformed files (access rules: tests/test_access.py);
  live_published_endpoints against real HTTP servers (live vs dead endpoints, replicas, waiting
  for a late publication, timeout error naming the directory and `sbatch slurm/serve.sh`,
  replicas serving different models); reachable_host; serving.running_server on an external
  engine without base_urls.
- config: external engine with base_urls and endpoint_dir, base_urls without
  served_model_name, endpoint_dir made absolute, the default endpoint directory.
- CLI: `config --get`, `offline-env` (also evaluated by bash), `status --remaining-iterations`
  (fresh run, no final imitation, partly and fully completed state.json), `serve` of an
  external server.
- slurm/submit.sh, iteration.sh, serve.sh run by bash without SLURM: usage errors, --iterations
  validation, missing lion-local, missing config, missing sbatch, the dependency chain submitted
  to a fake sbatch, a failing `status` not reported as a complete run; shebang, strict mode,
  #SBATCH lines (before the first command) and `bash -n`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import serving.published
from lion_local.cli import main
from lion_local.config import ConfigError, load_config
from lion_local.endpoints.access import api_key_for, endpoint_dir
from lion_local.offline import OFFLINE_ENVIRONMENT, offline_environ
from lion_local.stages.training_launch import (
    Allocation,
    LaunchError,
    current_allocation,
    multi_node_command,
)
from lion_local.endpoints.servers import config_server, wanted_server
from serving import server_launch
from serving.commands import executable, server_environment, vllm_command
from serving.process import ServerError, free_port
from serving.published import (
    live_published_endpoints,
    published_endpoint,
    reachable_host,
    read_published,
)

ROOT = Path(__file__).resolve().parents[1]
LION_LOCAL = Path(sys.executable).parent / "lion-local"
BASH = shutil.which("bash") or "/bin/bash"
WRAPPER = 'exec "$0" launch --machine_rank "$SLURM_NODEID" "$@"'


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str, path: str = "configs/tiny-cpu.yaml"):
    monkeypatch.chdir(ROOT)  # the config's relative paths are relative to the project root
    return load_config(path, [f"run_dir={tmp_path / 'run'}", *overrides])


def _write_script(path: Path, body: str) -> Path:
    """An executable Python script at `path` run by this test's interpreter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}", encoding="utf-8")
    path.chmod(0o755)
    return path


def _publish(config, name: str, base_url: str, model: str, api_key: str | None = None):
    return published_endpoint(name, endpoint_dir(config, name), base_url, model, api_key)


def _private_directory(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    return directory


def _write_endpoint(path: Path, content: str | bytes) -> None:
    """An endpoint file as a service job leaves it: this user's, mode 0600."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    path.chmod(0o600)


def _live(config, name: str):
    return live_published_endpoints(name, config.servers[name], endpoint_dir(config, name))


# ----------------------------------------------------------------------------------------------
# vllm_command and server_environment
# ----------------------------------------------------------------------------------------------

TEACHER_OVERRIDES = (
    "servers.teacher.vllm.tensor_parallel_size=4",
    "servers.teacher.vllm.data_parallel_size=2",
    "servers.teacher.vllm.max_model_len=4096",
    "servers.teacher.vllm.gpu_memory_utilization=0.85",
    "servers.teacher.served_model_name=llama-70b",
    "servers.teacher.host=0.0.0.0",
    "servers.teacher.port=8123",
)


def _teacher_config(tmp_path, monkeypatch, *overrides: str):
    return _config(tmp_path, monkeypatch, *TEACHER_OVERRIDES, *overrides, path="configs/lion-7b.yaml")


def _expected_vllm_args() -> list[str]:
    return [
        "serve",
        "--model",
        str(ROOT / "models" / "Llama-3.3-70B-Instruct"),
        "--host",
        "0.0.0.0",
        "--port",
        "8123",
        "--served-model-name",
        "llama-70b",
        "--tensor-parallel-size",
        "4",
        "--data-parallel-size",
        "2",
        "--gpu-memory-utilization",
        "0.85",
        "--dtype",
        "auto",
        "--generation-config",
        "vllm",
        "--max-model-len",
        "4096",
    ]


def test_vllm_command_exact_arguments(tmp_path, monkeypatch):
    config = _teacher_config(tmp_path, monkeypatch)
    server = config.servers["teacher"]
    assert server.engine == "vllm"  # from configs/teachers/llama-3.3-70b-instruct.yaml
    command = vllm_command(server, server.host, server.port)
    assert Path(command[0]).name == "vllm"
    assert command[0] == executable("vllm")
    assert command[1:] == _expected_vllm_args()


def test_vllm_command_without_max_model_len_omits_the_flag(tmp_path, monkeypatch):
    config = _teacher_config(tmp_path, monkeypatch, "servers.teacher.vllm.max_model_len=null")
    server = config.servers["teacher"]
    assert server.vllm.max_model_len is None
    command = vllm_command(server, "127.0.0.1", 9000)
    assert "--max-model-len" not in command
    expected = _expected_vllm_args()[:-2]  # without --max-model-len 4096
    expected[expected.index("--host") + 1] = "127.0.0.1"
    expected[expected.index("--port") + 1] = "9000"
    assert command[1:] == expected


def test_vllm_extra_args_are_appended_verbatim(tmp_path, monkeypatch):
    extra = ["--enforce-eager", "--max-num-seqs", "128", "--override-generation-config", '{"temperature": 0.5}']
    config = _teacher_config(tmp_path, monkeypatch, f"servers.teacher.vllm.extra_args={json.dumps(extra)}")
    server = config.servers["teacher"]
    assert server.vllm.extra_args == extra
    command = vllm_command(server, server.host, server.port)
    assert command[1:] == _expected_vllm_args() + extra


def test_server_launch_keeps_the_api_key_off_the_command_line(tmp_path, monkeypatch):
    secret = "sk-lion-test-9f8e7d6c"
    monkeypatch.setenv("LION_TEST_TEACHER_KEY", secret)
    config = _teacher_config(tmp_path, monkeypatch, "servers.teacher.api_key_env=LION_TEST_TEACHER_KEY")
    launch = server_launch(config.servers["teacher"], api_key_for(config, "teacher"))
    assert launch.command[1:] == _expected_vllm_args()
    assert not any(secret in argument for argument in launch.command)
    assert "--api-key" not in launch.command
    assert launch.environment["VLLM_API_KEY"] == secret
    assert launch.port == 8123
    assert launch.base_url == "http://127.0.0.1:8123/v1"  # 0.0.0.0 is reached through loopback
    assert launch.health_url == "http://127.0.0.1:8123/health"
    internal = int(launch.environment["VLLM_PORT"])
    assert 1 <= internal <= 65535 and internal != 8123


def test_server_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_PORT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # overridden: the servers never reach the network
    monkeypatch.setenv("LION_TEST_PASSTHROUGH", "kept")
    monkeypatch.setenv("LION_TEST_TEACHER_KEY", "sk-abc")
    config = _teacher_config(tmp_path, monkeypatch, "servers.teacher.api_key_env=LION_TEST_TEACHER_KEY")
    server = config.servers["teacher"]

    environment = server_environment(server, api_key_for(config, "teacher"), 41234, offline_environ())
    assert environment["VLLM_API_KEY"] == "sk-abc"
    assert environment["VLLM_PORT"] == "41234"
    for name, value in OFFLINE_ENVIRONMENT.items():
        assert environment[name] == value, name
    assert environment["LION_TEST_PASSTHROUGH"] == "kept"

    bare = server_environment(server, None, None, offline_environ())
    assert "VLLM_API_KEY" not in bare and "VLLM_PORT" not in bare
    assert all(bare[name] == value for name, value in OFFLINE_ENVIRONMENT.items())


def test_api_key_env_unset_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LION_TEST_UNSET_KEY", raising=False)
    config = _teacher_config(tmp_path, monkeypatch, "servers.teacher.api_key_env=LION_TEST_UNSET_KEY")
    with pytest.raises(ConfigError, match="LION_TEST_UNSET_KEY"):
        wanted_server(config, "teacher", tmp_path / "server.log")


# ----------------------------------------------------------------------------------------------
# multi_node_command
# ----------------------------------------------------------------------------------------------

ALLOCATION = Allocation(("gpu-a01", "gpu-a02", "gpu-a03"), cpus_per_task=32)
SRUN = ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=32"]


def _launch_tail(port: str = "29500") -> list[str]:
    return [
        "--num_machines",
        "3",
        "--num_processes",
        "24",
        "--main_process_ip",
        "gpu-a01",
        "--main_process_port",
        port,
        "--rdzv_backend",
        "c10d",
        "--dynamo_backend",
        "no",
    ]


@pytest.mark.parametrize("name", ["fsdp.yaml", "deepspeed-zero3.yaml"])
def test_accelerate_files_suit_one_srun_task_per_node(name: str):
    """accelerate reads each file; the rendezvous is left to the command line, and the checkpoint
    is saved whole (loadable by vLLM); DeepSpeed launches torchrun per node, not pdsh over ssh."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / name
    loaded = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert "rdzv_backend" not in raw and "same_network" not in raw
    if name == "fsdp.yaml":
        assert loaded.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    else:
        assert loaded.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
        assert loaded.deepspeed_config["zero3_save_16bit_model"] is True


def test_multi_node_command_with_an_accelerate_config(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "imitation.accelerate_config=configs/accelerate/fsdp.yaml")
    fsdp = str(ROOT / "configs" / "accelerate" / "fsdp.yaml")
    assert config.imitation.accelerate_config == fsdp
    job_file = tmp_path / "run" / "iter_1" / "sft_job.json"
    command = multi_node_command(config, job_file, ALLOCATION, 8)
    accelerate = executable("accelerate")
    assert Path(accelerate).name == "accelerate"
    assert command == [
        *SRUN,
        "bash",
        "-c",
        WRAPPER,
        accelerate,
        "--config_file",
        fsdp,
        *_launch_tail(),
        "-m",
        "lion_local.stages.sft",
        str(job_file),
    ]


@pytest.mark.parametrize("bf16, precision", [(True, "bf16"), (False, "no")])
def test_multi_node_command_without_an_accelerate_config(tmp_path, monkeypatch, bf16: bool, precision: str):
    config = _config(tmp_path, monkeypatch, f"imitation.trainer.bf16={str(bf16).lower()}")
    assert config.imitation.accelerate_config is None
    job_file = tmp_path / "job.json"
    command = multi_node_command(config, job_file, ALLOCATION, 8)
    assert command == [
        *SRUN,
        "bash",
        "-c",
        WRAPPER,
        executable("accelerate"),
        "--multi_gpu",
        "--mixed_precision",
        precision,
        *_launch_tail(),
        "-m",
        "lion_local.stages.sft",
        str(job_file),
    ]


def test_multi_node_command_rendezvous_port_and_no_cpus_per_task(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "imitation.rendezvous_port=29611")
    assert config.imitation.rendezvous_port == 29611
    allocation = Allocation(("n1", "n2"))
    command = multi_node_command(config, tmp_path / "job.json", allocation, 4)
    assert command[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert not any(argument.startswith("--cpus-per-task") for argument in command)
    assert command[command.index("--main_process_port") + 1] == "29611"
    assert command[command.index("--main_process_ip") + 1] == "n1"
    assert command[command.index("--num_processes") + 1] == "8"
    assert command[command.index("--num_machines") + 1] == "2"


def test_multi_node_command_needs_gpus(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch)
    with pytest.raises(LaunchError, match="GPU") as caught:
        multi_node_command(config, tmp_path / "job.json", ALLOCATION, 0)
    assert "3 nodes" in str(caught.value) and "--nodes=1" in str(caught.value)


def test_multi_node_wrapper_passes_the_node_rank_and_keeps_the_arguments(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "imitation.accelerate_config=configs/accelerate/fsdp.yaml")
    job_file = tmp_path / "iter 1" / "sft job.json"  # spaces must survive the wrapper
    command = multi_node_command(config, job_file, ALLOCATION, 8)
    start = command.index("bash")
    assert command[start : start + 3] == ["bash", "-c", WRAPPER]
    accelerate_at = start + 3
    assert command[accelerate_at] == executable("accelerate")
    fake = _write_script(tmp_path / "bin" / "accelerate", "import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    task = command[start:]
    task[3] = str(fake)
    remaining = command[accelerate_at + 1 :]
    for node_id in ("0", "2"):
        result = subprocess.run(
            task, env={**os.environ, "SLURM_NODEID": node_id}, capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == ["launch", "--machine_rank", node_id, *remaining]
    assert remaining[-3:] == ["-m", "lion_local.stages.sft", str(job_file)]


# ----------------------------------------------------------------------------------------------
# current_allocation
# ----------------------------------------------------------------------------------------------


def _fake_scontrol(directory: Path, record: Path | None = None) -> Path:
    """A `scontrol` that expands node[07-08] (and records its arguments) and fails otherwise."""
    body = (
        "import json, sys\n"
        f"record = {str(record) if record else ''!r}\n"
        "if record:\n"
        "    open(record, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1:] == ['show', 'hostnames', 'node[07-08]']:\n"
        "    print('node07\\nnode08')\n"
        "else:\n"
        "    sys.exit('scontrol: error: Invalid node name specified')\n"
    )
    return _write_script(directory / "scontrol", body)


def test_current_allocation_single_node():
    one = current_allocation({"SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_PER_TASK": "16", "SLURM_JOB_NODELIST": "gpu01"})
    assert one == Allocation(("localhost",), 16)
    assert not one.multi_node
    outside = current_allocation({})
    assert outside == Allocation(("localhost",), None)
    assert not outside.multi_node


def test_current_allocation_expands_the_node_list(tmp_path, monkeypatch):
    if shutil.which("scontrol") is None:
        _fake_scontrol(tmp_path / "bin")
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    environ = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_CPUS_PER_TASK": "32"}
    allocation = current_allocation(environ)
    assert allocation.nodes == ("node07", "node08")
    assert allocation.cpus_per_task == 32
    assert allocation.multi_node


def test_current_allocation_asks_scontrol_show_hostnames(tmp_path, monkeypatch):
    record = tmp_path / "scontrol-calls.jsonl"
    _fake_scontrol(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    allocation = current_allocation({"SLURM_NNODES": "2", "SLURM_NODELIST": "node[07-08]"})
    assert allocation == Allocation(("node07", "node08"), None)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [["show", "hostnames", "node[07-08]"]]


def test_current_allocation_without_a_node_list():
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST"):
        current_allocation({"SLURM_JOB_NUM_NODES": "2"})


def test_current_allocation_when_scontrol_fails_or_is_missing(tmp_path, monkeypatch):
    _fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(LaunchError, match=r"cannot expand SLURM_JOB_NODELIST='bad\[1-2\]'"):
        current_allocation({"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "bad[1-2]"})
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LaunchError, match="scontrol"):
        current_allocation({"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[07-08]"})


# ----------------------------------------------------------------------------------------------
# Published endpoints
# ----------------------------------------------------------------------------------------------


@contextmanager
def _health_server():
    """A real HTTP server on a free port answering /health with 200; yields its /v1 base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class FakeClock:
    """Stands in for serving.published's `time` and its poll_pause: monotonic() reads a clock that only sleep() moves,
    each sleep is recorded, and at(moment, action) runs an action once the clock has reached a
    moment (a service job publishing late). The waits are then the code's own, on any host."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._due: list[tuple[float, object]] = []

    def __getattr__(self, name: str):
        return getattr(time, name)  # strftime and the rest: the real module's

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        for moment, action in list(self._due):
            if moment <= self.now:
                self._due.remove((moment, action))
                action()

    async def pause(self, seconds: float) -> None:
        self.sleep(seconds)  # serving.published.poll_pause: the async wait, on the same clock

    def at(self, moment: float, action) -> None:
        self._due.append((moment, action))


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(serving.published, "time", fake)
    monkeypatch.setattr(serving.published, "poll_pause", fake.pause)
    return fake


@pytest.fixture
def external(tmp_path, monkeypatch):
    """tiny-cpu with the teacher external and no base_urls: it reads published endpoints."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.setattr(serving.published, "POLL_INTERVAL_S", 0.1)
    return _config(tmp_path, monkeypatch, "servers.teacher.engine=external", "servers.teacher.startup_timeout_s=1.5")


def test_published_endpoint_file(external, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    directory = endpoint_dir(external, "teacher")
    assert directory == tmp_path / "run" / "endpoints" / "teacher"
    with _publish(external, "teacher", "http://hostx:1234/v1", "model-x", "key-of-4242") as path:
        assert path.parent == directory
        assert path.name == "4242-hostx-1234.json"
        assert sorted(directory.iterdir()) == [path]  # no temporary file left behind
        assert path.stat().st_mode & 0o777 == 0o600 and directory.stat().st_mode & 0o777 == 0o700
        record = json.loads(path.read_text())
        assert record["api_key"] == "key-of-4242"
        assert record["base_url"] == "http://hostx:1234/v1"
        assert record["model"] == "model-x"
        assert record["host"] == "hostx"
        assert record["port"] == 1234
        assert record["server"] == "teacher"
        assert record["slurm_job_id"] == "4242"
        assert record["slurm_array_task_id"] == "1"
        assert record["pid"] == os.getpid()
    assert not path.exists()
    assert list(directory.iterdir()) == []


def test_published_endpoint_outside_slurm_is_local_and_withdrawn_on_error(external):
    with (
        pytest.raises(RuntimeError, match="server died"),
        _publish(external, "teacher", "http://hostx:1234/v1", "model-x") as path,
    ):
        assert path.name == "local-hostx-1234.json"
        assert path.exists()
        raise RuntimeError("server died")
    assert not path.exists()


def test_published_endpoint_in_a_configured_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    config = _config(
        tmp_path, monkeypatch, "servers.teacher.engine=external", f"servers.teacher.endpoint_dir={tmp_path / 'eps'}"
    )
    assert endpoint_dir(config, "teacher") == tmp_path / "eps"
    with _publish(config, "teacher", "http://hosty:80/v1", "m") as path:
        assert path == tmp_path / "eps" / "local-hosty-80.json"
    assert not (tmp_path / "run" / "endpoints").exists()


def test_read_published_skips_malformed_files(tmp_path):
    directory = _private_directory(tmp_path / "eps")
    good = {"base_url": "http://a:1/v1", "model": "m", "host": "a", "port": 1}
    _write_endpoint(directory / "1-a-1.json", json.dumps(good))
    _write_endpoint(directory / "2-b-2.json", '{"base_url": "http://b:2/v1", "mod')  # torn
    _write_endpoint(directory / "3-c-3.json", json.dumps({"model": "m", "host": "c", "port": 3}))  # no base_url
    _write_endpoint(directory / "4-d-4.json", json.dumps({"base_url": "http://d:4/v1", "model": 7}))  # model not str
    _write_endpoint(directory / "5-e-5.json", b"\xff\xfe not utf-8")
    _write_endpoint(directory / "6-f-6.json", json.dumps({"base_url": "http://f:6/v1", "model": "m", "api_key": 6}))
    (directory / "notes.txt").write_text("not an endpoint")
    records = read_published(directory)
    assert len(records) == 1
    assert records[0]["base_url"] == "http://a:1/v1"
    assert records[0]["model"] == "m"
    assert records[0]["file"] == str(directory / "1-a-1.json")


def test_read_published_skips_json_that_is_not_an_object(tmp_path):
    # The docstring promises every file that is not a well-formed endpoint is skipped with a warning;
    # valid JSON that is not an object (a list, null, a string) is not a well-formed endpoint either.
    directory = _private_directory(tmp_path / "eps")
    _write_endpoint(directory / "1-a-1.json", json.dumps({"base_url": "http://a:1/v1", "model": "m"}))
    for content in ("[1, 2]", "null", '"http://b:2/v1"'):
        _write_endpoint(directory / "2-b-2.json", content)
        records = read_published(directory)
        assert [record["base_url"] for record in records] == ["http://a:1/v1"], content


def test_live_published_endpoints_keep_only_the_live_ones(external, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with _health_server() as live, ExitStack() as stack:
        stack.enter_context(_publish(external, "teacher", live, "model-x"))
        stack.enter_context(_publish(external, "teacher", dead, "model-x"))
        assert len(list(endpoint_dir(external, "teacher").glob("*.json"))) == 2
        assert _live(external, "teacher") == ({live: None}, "model-x")
        with config_server(external, "teacher", tmp_path / "logs") as endpoint:
            assert endpoint.name == "teacher"
            assert endpoint.base_urls == [live]
            assert endpoint.model == "model-x"
            assert endpoint.api_key is None


def test_live_published_endpoints_balance_over_replicas(external):
    with _health_server() as first, _health_server() as second, ExitStack() as stack:
        for url, key in ((first, "key-1"), (second, "key-2")):
            stack.enter_context(_publish(external, "teacher", url, "model-x", key))
        published, model = _live(external, "teacher")
        with config_server(external, "teacher", Path("unused-logs")) as endpoint:
            assert sorted(endpoint.base_urls) == sorted([first, second])
            assert endpoint.api_keys == {first: "key-1", second: "key-2"}  # each replica requires its own
    assert published == {first: "key-1", second: "key-2"}
    assert model == "model-x"


def test_live_published_endpoints_wait_for_a_late_publication(external, clock):
    directory = endpoint_dir(external, "teacher")
    poll = serving.published.POLL_INTERVAL_S
    with _health_server() as live:

        def publish() -> None:
            _private_directory(directory)
            temporary = directory / ".late.json.tmp"
            _write_endpoint(temporary, json.dumps({"base_url": live, "model": "late-model"}))
            os.replace(temporary, directory / "local-late.json")

        clock.at(3.5 * poll, publish)  # between the third and the fourth poll's wait
        assert _live(external, "teacher") == ({live: None}, "late-model")
    # It kept polling, one interval apart, and found the file at the first poll after it appeared,
    # well before startup_timeout_s (15 intervals).
    assert clock.sleeps == [poll] * 4


def test_live_published_endpoints_time_out_when_nothing_is_published(external, clock):
    directory = endpoint_dir(external, "teacher")
    with pytest.raises(ServerError) as caught:
        _live(external, "teacher")
    # Polled one interval apart for the whole startup_timeout_s, and gave up at the first poll past it.
    timeout, poll = external.servers["teacher"].startup_timeout_s, serving.published.POLL_INTERVAL_S
    assert set(clock.sleeps) == {poll}
    assert timeout < sum(clock.sleeps) <= timeout + poll + 1e-9
    message = str(caught.value)
    assert str(directory) in message
    assert "sbatch slurm/serve.sh" in message
    assert "no endpoint file there" in message
    assert not directory.exists()  # reading never creates the directory


def test_live_published_endpoints_time_out_when_none_answers(external, clock):
    external.servers["teacher"].startup_timeout_s = 0.5
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with (
        _publish(external, "teacher", dead, "model-x"),
        pytest.raises(ServerError, match="1 file\\(s\\) there, none answering /health"),
    ):
        _live(external, "teacher")
    assert 0.5 < sum(clock.sleeps) <= 0.5 + serving.published.POLL_INTERVAL_S + 1e-9  # the whole timeout, polling


def test_live_published_endpoints_refuse_different_models(external, clock):
    with _health_server() as first, _health_server() as second, ExitStack() as stack:
        stack.enter_context(_publish(external, "teacher", first, "model-a"))
        stack.enter_context(_publish(external, "teacher", second, "model-b"))
        with pytest.raises(ServerError, match="different models") as caught:
            _live(external, "teacher")
        assert clock.sleeps == []  # an error at the first look, not after waiting for the timeout
    assert "model-a" in str(caught.value) and "model-b" in str(caught.value)


def test_reachable_host():
    for wildcard in ("0.0.0.0", "::", ""):
        assert reachable_host(wildcard) == socket.gethostname()
    assert reachable_host("gpu-a01") == "gpu-a01"
    assert reachable_host("127.0.0.1") == "127.0.0.1"


# ----------------------------------------------------------------------------------------------
# Config validation of external servers
# ----------------------------------------------------------------------------------------------


def test_external_with_base_urls_and_endpoint_dir_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="base_urls or endpoint_dir") as caught:
        _config(
            tmp_path,
            monkeypatch,
            "servers.teacher.engine=external",
            'servers.teacher.base_urls=["http://h:1/v1"]',
            "servers.teacher.served_model_name=t",
            f"servers.teacher.endpoint_dir={tmp_path / 'eps'}",
        )
    assert "servers.teacher" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_external_base_urls_need_served_model_name(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="served_model_name") as caught:
        _config(tmp_path, monkeypatch, "servers.teacher.engine=external", 'servers.teacher.base_urls=["http://h:1/v1"]')
    assert "servers.teacher" in str(caught.value)
    config = _config(
        tmp_path,
        monkeypatch,
        "servers.teacher.engine=external",
        'servers.teacher.base_urls=["http://h:1/v1"]',
        "servers.teacher.served_model_name=t",
    )
    assert config.servers["teacher"].base_urls == ["http://h:1/v1"]


def test_endpoint_dir_is_made_absolute(tmp_path, monkeypatch):
    config = _config(tmp_path, monkeypatch, "servers.teacher.engine=external", "servers.teacher.endpoint_dir=shared/eps")
    assert config.servers["teacher"].endpoint_dir == str(ROOT / "shared" / "eps")
    assert endpoint_dir(config, "teacher") == ROOT / "shared" / "eps"
    assert endpoint_dir(config, "teacher").is_absolute()
    default = _config(tmp_path, monkeypatch)
    assert endpoint_dir(default, "student") == tmp_path / "run" / "endpoints" / "student"
    assert endpoint_dir(default, "student").is_absolute()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _cli(monkeypatch, *args: str):
    monkeypatch.chdir(ROOT)
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_config_get(monkeypatch):
    result = _cli(monkeypatch, "config", "--config", "configs/tiny-cpu.yaml", "--get", "run_dir")
    assert result.exit_code == 0, result.output
    value = result.stdout.strip()
    assert result.stdout == value + "\n"
    assert Path(value).is_absolute()
    assert value == str(ROOT / "runs" / "tiny-cpu")
    assert value.endswith("runs/tiny-cpu")

    result = _cli(monkeypatch, "config", "--config", "configs/tiny-cpu.yaml", "--get", "generation.new_per_iteration")
    assert result.exit_code == 0
    assert result.stdout == "16\n"

    result = _cli(monkeypatch, "config", "--config", "configs/tiny-cpu.yaml", "--set", "seed=7", "--get", "seed")
    assert result.stdout == "7\n"


def test_config_get_unknown_key(monkeypatch):
    result = _cli(monkeypatch, "config", "--config", "configs/tiny-cpu.yaml", "--get", "nope.x")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert "nope" in lines[0] and lines[0].startswith("error:")


def test_offline_env_prints_exports(monkeypatch):
    result = _cli(monkeypatch, "offline-env")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [f"export {name}={value}" for name, value in OFFLINE_ENVIRONMENT.items()]


def test_offline_env_evaluated_by_bash(tmp_path):
    assert LION_LOCAL.exists(), f"{LION_LOCAL} is missing; install the project into the virtualenv"
    environment = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENVIRONMENT}
    environment["WANDB_MODE"] = "online"  # must be overridden
    result = subprocess.run(
        [BASH, "-c", 'eval "$("$0" offline-env)"; env', str(LION_LOCAL)],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    for name, value in OFFLINE_ENVIRONMENT.items():
        assert seen.get(name) == value, name


def _remaining(monkeypatch, run_dir: Path, *overrides: str):
    args = ["status", "--config", "configs/tiny-cpu.yaml", "--set", f"run_dir={run_dir}"]
    for override in overrides:
        args += ["--set", override]
    return _cli(monkeypatch, *args, "--remaining-iterations")


def test_status_remaining_iterations_of_a_new_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = _remaining(monkeypatch, run_dir)
    assert result.exit_code == 0
    assert result.stdout == "1\n2\nfinal\n"
    result = _remaining(monkeypatch, run_dir, "imitation.final_imitation=false")
    assert result.stdout == "1\n2\n"
    assert list(run_dir.iterdir()) == []  # status writes nothing


def test_status_remaining_iterations_of_a_started_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    completed = ["1/imitation", "1/discrimination", "1/generation", "2/imitation"]
    state = {"iteration": 2, "completed": completed, "stage_seconds": {marker: 1.0 for marker in completed}}
    (run_dir / "state.json").write_text(json.dumps(state))
    assert _remaining(monkeypatch, run_dir).stdout == "2\nfinal\n"
    assert _remaining(monkeypatch, run_dir, "imitation.final_imitation=false").stdout == "2\n"

    state["completed"] = [*completed, "2/discrimination", "2/generation"]
    (run_dir / "state.json").write_text(json.dumps(state))
    assert _remaining(monkeypatch, run_dir).stdout == "final\n"
    state["completed"].append("final/imitation")
    (run_dir / "state.json").write_text(json.dumps(state))
    result = _remaining(monkeypatch, run_dir)
    assert result.exit_code == 0 and result.stdout == ""


def test_serve_an_external_server_is_refused(tmp_path, monkeypatch):
    result = _cli(
        monkeypatch,
        "serve",
        "teacher",
        "--config",
        "configs/tiny-cpu.yaml",
        "--set",
        f"run_dir={tmp_path / 'run'}",
        "--set",
        "servers.teacher.engine=external",
    )
    assert result.exit_code == 2
    assert "nothing to start" in result.stderr
    assert str(tmp_path / "run" / "endpoints" / "teacher") in result.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Batch scripts, run without SLURM
# ----------------------------------------------------------------------------------------------

SCRIPTS = ("submit.sh", "iteration.sh", "serve.sh")


def _bash(script: str, *args: str, env: dict | None = None, extra_env: dict | None = None, cwd: Path = ROOT):
    environment = dict(os.environ if env is None else env)
    environment.update(extra_env or {})
    return subprocess.run(
        [BASH, str(ROOT / "slurm" / script), *args],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def fake_sbatch(tmp_path):
    """PATH with a fake `sbatch` first: it records each call and prints ids 1000, 1001, ... ("id;cluster")."""
    bin_dir = tmp_path / "fake-bin"
    record = tmp_path / "sbatch-calls.jsonl"
    _write_script(
        bin_dir / "sbatch",
        "import json, sys\n"
        f"record = {str(record)!r}\n"
        "try:\n"
        "    count = len(open(record).read().splitlines())\n"
        "except FileNotFoundError:\n"
        "    count = 0\n"
        "open(record, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print(f'{1000 + count};cluster-a')\n",
    )
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    environment["LION_LOCAL"] = str(LION_LOCAL)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    return environment, calls


def test_submit_usage_and_iterations_errors(fake_sbatch):
    environment, calls = fake_sbatch
    result = _bash("submit.sh", env=environment)
    assert result.returncode == 2
    assert "usage" in result.stderr
    result = _bash("submit.sh", "--iterations", "2", env=environment)
    assert result.returncode == 2 and "usage" in result.stderr
    for bad in (["--iterations", "0"], ["--iterations", "x"], ["--iterations"], ["--iterations=0"], ["--iterations=-1"]):
        result = _bash("submit.sh", "configs/tiny-cpu.yaml", *bad, env=environment)
        assert result.returncode == 2, bad
        assert "--iterations" in result.stderr, bad
    assert calls() == []


def test_submit_without_sbatch(tmp_path):
    assert LION_LOCAL.exists()
    bin_dir = tmp_path / "bin-without-sbatch"
    bin_dir.mkdir()
    dirname = shutil.which("dirname")
    assert dirname is not None
    (bin_dir / "dirname").symlink_to(dirname)
    environment = {"PATH": str(bin_dir), "HOME": str(tmp_path), "LION_LOCAL": str(LION_LOCAL)}
    result = _bash("submit.sh", "configs/tiny-cpu.yaml", env=environment)
    assert result.returncode == 2
    assert "sbatch not found" in result.stderr


def test_submit_without_lion_local(fake_sbatch):
    environment, calls = fake_sbatch
    result = _bash("submit.sh", "configs/tiny-cpu.yaml", env=environment, extra_env={"LION_LOCAL": "/nonexistent/lion"})
    assert result.returncode == 2
    assert "LION_LOCAL" in result.stderr
    assert calls() == []


def test_submit_chains_the_remaining_iterations(fake_sbatch, tmp_path):
    environment, calls = fake_sbatch
    run_dir = tmp_path / "run"
    result = _bash("submit.sh", "configs/tiny-cpu.yaml", "--set", f"run_dir={run_dir}", env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1000\n1001\n1002\n"  # "id;cluster" cut to the id
    iteration_sh = str(ROOT / "slurm" / "iteration.sh")
    tail = [iteration_sh, "configs/tiny-cpu.yaml", "--set", f"run_dir={run_dir}"]
    # The script names iteration.sh by its own directory; compare it resolved.
    submitted = [[str(Path(a).resolve()) if a.endswith("/iteration.sh") else a for a in call] for call in calls()]
    assert submitted == [
        ["--parsable", "--job-name=lion-iter-1", *tail],
        ["--parsable", "--job-name=lion-iter-2", "--dependency=afterok:1000", "--kill-on-invalid-dep=yes", *tail],
        ["--parsable", "--job-name=lion-iter-final", "--dependency=afterok:1001", "--kill-on-invalid-dep=yes", *tail],
    ]
    assert not run_dir.exists()  # submitting writes nothing in the run directory


def test_submit_limits_the_chain_and_submits_nothing_for_a_complete_run(fake_sbatch, tmp_path):
    environment, calls = fake_sbatch
    run_dir = tmp_path / "run"
    result = _bash(
        "submit.sh", "configs/tiny-cpu.yaml", "--iterations", "2", "--set", f"run_dir={run_dir}", env=environment
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1000\n1001\n"
    assert [call[1] for call in calls()] == ["--job-name=lion-iter-1", "--job-name=lion-iter-2"]

    run_dir.mkdir()
    markers = [f"{k}/{stage}" for k in (1, 2) for stage in ("imitation", "discrimination", "generation")]
    state = {"iteration": 2, "completed": [*markers, "final/imitation"], "stage_seconds": {}}
    (run_dir / "state.json").write_text(json.dumps(state))
    result = _bash("submit.sh", "configs/tiny-cpu.yaml", "--set", f"run_dir={run_dir}", env=environment)
    assert result.returncode == 0
    assert result.stdout == ""
    assert "complete" in result.stderr
    assert len(calls()) == 2  # nothing more submitted


def test_submit_with_a_bad_config_submits_nothing(fake_sbatch, tmp_path):
    environment, calls = fake_sbatch
    result = _bash("submit.sh", "configs/tiny-cpu.yaml", "--set", "generation.nope=1", env=environment)
    assert result.returncode == 2
    assert "generation.nope" in result.stderr
    assert calls() == []


def test_submit_does_not_report_a_failed_status_as_a_complete_run(fake_sbatch, tmp_path):
    # `lion-local status` fails on a corrupt state.json; submit.sh must fail too, not say "complete".
    environment, calls = fake_sbatch
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text("{broken")
    result = _bash("submit.sh", "configs/tiny-cpu.yaml", "--set", f"run_dir={run_dir}", env=environment)
    assert calls() == []
    assert "nothing to submit" not in result.stderr
    assert result.returncode != 0


@pytest.mark.parametrize("script", ["iteration.sh", "serve.sh"])
def test_batch_script_usage_and_early_errors(script, tmp_path):
    assert LION_LOCAL.exists()
    result = _bash(script)
    assert result.returncode == 2
    assert "usage" in result.stderr
    result = _bash(script, "--set", "seed=1")
    assert result.returncode == 2 and "usage" in result.stderr

    result = _bash(script, "configs/tiny-cpu.yaml", extra_env={"LION_LOCAL": "/nonexistent"})
    assert result.returncode == 2
    assert "/nonexistent not found" in result.stderr
    assert "LION_LOCAL" in result.stderr

    result = _bash(script, "missing.yaml", extra_env={"LION_LOCAL": str(LION_LOCAL)})
    assert result.returncode == 2
    assert "config missing.yaml not found" in result.stderr

    result = _bash(script, "configs/tiny-cpu.yaml", extra_env={"LION_LOCAL": str(LION_LOCAL)}, cwd=tmp_path)
    assert result.returncode == 2  # relative to the project root, not found from elsewhere
    assert "not found from" in result.stderr and str(tmp_path) in result.stderr
    assert list(tmp_path.iterdir()) == []


def _sbatch_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_batch_script_shape(script):
    text = (ROOT / "slurm" / script).read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    result = subprocess.run([BASH, "-n", str(ROOT / "slurm" / script)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    # sbatch reads #SBATCH lines only up to the first command of the script.
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))


def test_iteration_script_sbatch_defaults():
    text = (ROOT / "slurm" / "iteration.sh").read_text()
    sbatch = _sbatch_lines(text)
    for wanted in ("--requeue", "--signal=B:USR1@300", "--gpus-per-node=8", "--nodes=1"):
        assert f"#SBATCH {wanted}" in sbatch, wanted
    assert "${SLURM_JOB_ID:-local}" in text
