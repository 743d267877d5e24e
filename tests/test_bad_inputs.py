"""Bad inputs: a systematic table of bad seed files and bad configs.

Each case must make the run commands exit with code 2 and print one line on stderr,
"error: ...", that names the file and the line (or item), or the config key. The run directory
is not created, or is left byte-for-byte unchanged when it already exists.

The real CLI runs in-process (click's CliRunner keeps stderr apart from stdout), and a few cases
also run as a real `python -m lion_local` process. No model is built: the model directories hold
a config.json with a model_type and an empty model.safetensors, which is all the checks before a
run look at, and `tiny_models` is null.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lion_local.cli import main
from lion_local.config import Config, load_config
from lion_local.stages.loop import check_inputs
from lion_local.run.layout import RunDir

ROOT = Path(__file__).resolve().parents[1]
UNSET_VARIABLE = "LION_BAD_INPUTS_UNSET_KEY"
DELETE = object()  # a value in Workspace.config(...) that removes the key

GOOD_SEEDS = [
    {"instruction": "Name three primary colours."},
    {"instruction": "Translate the sentence into French.", "input": "The cat sleeps."},
    {"instruction": "Write a haiku about rain."},
    {"instruction": "Explain what a prime number is."},
]


def _jsonl(*records: object) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


GOOD_JSONL = _jsonl(*GOOD_SEEDS)


@pytest.fixture(autouse=True)
def _keep_sigterm_handler():
    """`run`, `iteration` and `stage` install a SIGTERM handler; in-process runs must not leave it to pytest."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture(autouse=True)
def _unset_variable(monkeypatch):
    monkeypatch.delenv(UNSET_VARIABLE, raising=False)


# ----------------------------------------------------------------------------------------------
# A workspace: a good config, good seeds and two empty "model" directories under tmp_path
# ----------------------------------------------------------------------------------------------


@dataclass
class Workspace:
    root: Path

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def seeds(self) -> Path:
        return self.root / "seeds.jsonl"

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def base_data(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "seed": 0,
            "iterations": 1,
            "seed_data": str(self.seeds),
            "tiny_models": None,
            "servers": {
                "teacher": {"engine": "transformers", "model": str(self.model("teacher"))},
                "student": {"engine": "transformers", "model": str(self.model("student"))},
            },
            "generation": {"new_per_iteration": 4, "hard_ratio": 0.5, "rouge_threshold": 0.7},
            "discrimination": {"tau": 1.0},
        }

    def config(self, name: str = "run.yaml", **dotted: object) -> Path:
        """The good config with keys changed (`generation__hard_ratio=1.5`; DELETE removes a key)."""
        data = self.base_data()
        for key, value in dotted.items():
            *parents, leaf = key.split("__")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            if value is DELETE:
                node.pop(leaf, None)
            else:
                node[leaf] = value
        return self.write(name, yaml.safe_dump(data, sort_keys=False))

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path


def stand_in_model(directory: Path) -> Path:
    """A model directory as the checks before a run see one: config.json with a model_type, and weights."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}\n')
    (directory / "model.safetensors").write_bytes(b"")
    return directory


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    workspace = Workspace(tmp_path)
    for name in ("teacher", "student"):
        stand_in_model(workspace.model(name))
    workspace.seeds.write_bytes(GOOD_JSONL)
    return workspace


def _snapshot(directory: Path) -> dict[str, tuple]:
    """Every path under `directory` with its kind, mode, bytes and modification time."""
    tree: dict[str, tuple] = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            tree[str(path.relative_to(directory))] = ("link", os.readlink(path))
        elif path.is_dir():
            tree[str(path.relative_to(directory))] = ("dir", info.st_mode, info.st_mtime_ns)
        elif not stat.S_ISREG(info.st_mode):  # a case's FIFO: reading it would block
            tree[str(path.relative_to(directory))] = ("special", info.st_mode, info.st_mtime_ns)
        else:
            try:
                content: bytes | None = path.read_bytes()
            except PermissionError:  # a case's chmod-000 file (when not running as root)
                content = None
            tree[str(path.relative_to(directory))] = ("file", info.st_mode, info.st_mtime_ns, content)
    return tree


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args)


def _assert_one_line_error(result, expected: list[str]) -> str:
    """Exit code 2, nothing on stdout, exactly one line on stderr: 'error: ...' holding each expected part."""
    detail = f"exit {result.exit_code}, stdout {result.stdout!r}, stderr {result.stderr!r}, exception {result.exception!r}"
    assert result.exit_code == 2, detail
    assert result.stdout == "", detail
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("error: "), detail
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"
    return line


def _check_case(ws: Workspace, command: list[str], args: list[str], expected: list[str]) -> str:
    """Run the command on a fresh workspace: one-line exit-2 error, no run directory, nothing written."""
    before = _snapshot(ws.root)
    line = _assert_one_line_error(_invoke([*command, *args]), expected)
    assert not ws.run_dir.exists(), f"{ws.run_dir} was created"
    assert _snapshot(ws.root) == before, "files under the workspace changed"
    return line


# ----------------------------------------------------------------------------------------------
# The baseline: without the one thing each case breaks, the inputs are accepted
# ----------------------------------------------------------------------------------------------


def test_the_good_workspace_passes_every_check_before_a_run(ws: Workspace):
    config = load_config(ws.config())
    assert isinstance(config, Config) and config.tiny_models is None
    check_inputs(config, RunDir(config.run_dir))  # models, API keys, seed file: all fine
    assert not ws.run_dir.exists()
    result = _invoke(["status", "--config", str(ws.config())])
    assert result.exit_code == 0 and "not started" in result.stdout, result.stderr
    json_list = ws.write("seeds.json", json.dumps(GOOD_SEEDS, indent=2))
    check_inputs(load_config(ws.config(seed_data=str(json_list))), RunDir(config.run_dir))


# ----------------------------------------------------------------------------------------------
# Seed files: content cases. "{path}" in an expected part is the seed file's path.
# ----------------------------------------------------------------------------------------------

_LINE_3_BROKEN = GOOD_JSONL.splitlines(keepends=True)
SEED_CONTENT_CASES = [
    # (id, file name, content, expected parts)
    (
        "bad-json-on-line-3",
        "seeds.jsonl",
        b"".join([*_LINE_3_BROKEN[:2], b'{"instruction": "Broken line" \n', *_LINE_3_BROKEN[2:]]),
        ["{path}:3: invalid JSON"],
    ),
    (
        "missing-instruction-field",
        "seeds.jsonl",
        _jsonl(GOOD_SEEDS[0], {"input": "orphan input"}, GOOD_SEEDS[2]),
        ["{path}:2: field 'instruction' is missing"],
    ),
    (
        "misspelled-instruction-field",
        "seeds.jsonl",
        _jsonl(GOOD_SEEDS[0], GOOD_SEEDS[1], {"instrution": "Say hello."}),
        ["{path}:3: field 'instruction'"],
    ),
    ("instruction-null", "seeds.jsonl", _jsonl(GOOD_SEEDS[0], {"instruction": None}), ["{path}:2: field 'instruction'"]),
    ("instruction-a-number", "seeds.jsonl", _jsonl({"instruction": 42}), ["{path}:1: field 'instruction'", "not a string"]),
    ("instruction-a-list", "seeds.jsonl", _jsonl(GOOD_SEEDS[0], {"instruction": ["a"]}), ["{path}:2:", "not a string"]),
    ("instruction-empty", "seeds.jsonl", _jsonl(GOOD_SEEDS[0], {"instruction": ""}), ["{path}:2: field 'instruction' is empty"]),
    (
        "instruction-whitespace-only",
        "seeds.jsonl",
        _jsonl(GOOD_SEEDS[0], GOOD_SEEDS[1], {"instruction": " \t\n  "}),
        ["{path}:3: field 'instruction' is empty"],
    ),
    (
        "duplicate-instruction-and-input",
        "seeds.jsonl",
        _jsonl(*GOOD_SEEDS, dict(GOOD_SEEDS[1])),
        ["{path}:5: duplicate of the instruction at {path}:2"],
    ),
    (
        "duplicate-after-trimming-spaces",
        "seeds.jsonl",
        _jsonl(GOOD_SEEDS[0], GOOD_SEEDS[2], {"instruction": "  Name three primary colours.  "}),
        ["{path}:3: duplicate of the instruction at {path}:1"],
    ),
    (
        "duplicate-in-json-list",
        "seeds.json",
        json.dumps([GOOD_SEEDS[0], GOOD_SEEDS[2], GOOD_SEEDS[0]], indent=2).encode(),
        ["{path}: item 2: duplicate of the instruction at {path}: item 0"],
    ),
    (
        "non-utf8-bytes-on-line-2",
        "seeds.jsonl",
        GOOD_JSONL.splitlines(keepends=True)[0] + b'{"instruction": "Describe a caf\xe9."}\n' + GOOD_JSONL.split(b"\n", 1)[1],
        ["{path}:2: not valid UTF-8"],
    ),
    (
        "non-utf8-bytes-in-json-list-line-3",
        "seeds.json",
        b'[\n  {"instruction": "Name a colour."},\n  {"instruction": "Na\xefve question?"}\n]\n',
        ["{path}:3: not valid UTF-8"],
    ),
    (
        "utf8-bom",
        "seeds.jsonl",
        b"\xef\xbb\xbf" + GOOD_JSONL,
        ["{path}:1: invalid JSON", "BOM"],
    ),
    (
        "instruction-over-1-MB",
        "seeds.jsonl",
        _jsonl(GOOD_SEEDS[0], {"instruction": "a" * 1_000_001}),
        ["{path}:2:", "1000001 characters"],
    ),
    (
        "input-not-a-string",
        "seeds.jsonl",
        _jsonl(GOOD_SEEDS[0], {"instruction": "Add the numbers.", "input": 5}),
        ["{path}:2: field 'input' must be a string"],
    ),
    (
        "jsonl-line-not-an-object",
        "seeds.jsonl",
        _jsonl(GOOD_SEEDS[0], "Name a shape."),
        ["{path}:2: expected an object with an 'instruction' field"],
    ),
    (
        "top-level-object-not-list",
        "seeds.json",
        json.dumps({"data": GOOD_SEEDS}, indent=2).encode(),
        ["{path}: top level is an object", "must be a list"],
    ),
    (
        "json-list-with-a-string-item",
        "seeds.json",
        json.dumps([GOOD_SEEDS[0], "Name a shape.", GOOD_SEEDS[2]]).encode(),
        ["{path}: item 1: expected an object"],
    ),
    (
        "json-list-syntax-error-on-line-4",
        "seeds.json",
        b'[\n  {"instruction": "A first one."},\n  {"instruction": "A second one."},\n  {"instruction": "A third one.",}\n]\n',
        ["{path}:4: invalid JSON"],
    ),
    ("empty-file", "seeds.jsonl", b"", ["{path}: the seed data file is empty"]),
    ("whitespace-only-file", "seeds.jsonl", b"\n   \n\t\r\n", ["{path}: the seed data file is empty"]),
    (
        "crlf-line-endings-bad-line-2",
        "seeds.jsonl",
        b'{"instruction": "Name a colour."}\r\n{"instruction": }\r\n{"instruction": "Name a shape."}\r\n',
        ["{path}:2: invalid JSON"],
    ),
    (
        # U+2028 is legal inside a JSON string; only "\n" ends a JSONL line, so the bad line is still 3.
        "line-separator-inside-a-string-keeps-line-numbers",
        "seeds.jsonl",
        json.dumps({"instruction": "Two\u2028parts."}, ensure_ascii=False).encode() + b'\n{"instruction": "Ok."}\n{"oops"\n',
        ["{path}:3: invalid JSON"],
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [pytest.param(name, content, expected, id=case_id) for case_id, name, content, expected in SEED_CONTENT_CASES],
)
def test_bad_seed_content(ws: Workspace, name: str, content: bytes, expected: list[str]):
    seeds = ws.write(name, content)
    config = ws.config(seed_data=str(seeds))
    _check_case(ws, ["run"], ["--config", str(config)], [part.format(path=seeds) for part in expected])


# ----------------------------------------------------------------------------------------------
# Seed files that cannot be read at all
# ----------------------------------------------------------------------------------------------


def _seed_directory(ws: Workspace) -> tuple[Path, list[str]]:
    directory = ws.root / "seeds-dir.jsonl"
    directory.mkdir()
    return directory, [f"{directory}: cannot read seed data"]


def _seed_missing(ws: Workspace) -> tuple[Path, list[str]]:
    missing = ws.root / "no-such-seeds.jsonl"
    return missing, [f"{missing}: seed data file not found"]


def _seed_dangling_link(ws: Workspace) -> tuple[Path, list[str]]:
    link, target = ws.root / "link.jsonl", ws.root / "gone.jsonl"
    link.symlink_to(target)
    # Config paths are made absolute with Path.resolve(), so the error names the missing target.
    return link, [f"{target}: seed data file not found"]


def _seed_no_permission(ws: Workspace) -> tuple[Path, list[str]]:
    locked = ws.write("locked.jsonl", GOOD_JSONL)
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        locked.chmod(0o644)
        reason = (
            f"chmod 000 does not stop this user (uid {os.getuid()}) from reading {locked}: "
            "the unreadable-seed case uses a directory as the seed path instead"
        )
        print(reason)
        warnings.warn(reason, stacklevel=2)
        return _seed_directory(ws)
    return locked, [f"{locked}: cannot read seed data", "Permission denied"]


SEED_PATH_CASES = {
    "missing-seed-file": _seed_missing,
    "seed-path-is-a-directory": _seed_directory,
    "seed-path-is-a-dangling-symlink": _seed_dangling_link,
    "seed-file-without-read-permission": _seed_no_permission,
}


@pytest.mark.parametrize("make", list(SEED_PATH_CASES.values()), ids=list(SEED_PATH_CASES))
def test_unreadable_seed_path(ws: Workspace, make: Callable):
    seeds, expected = make(ws)
    config = ws.config(seed_data=str(seeds))
    try:
        _check_case(ws, ["run"], ["--config", str(config)], expected)
    finally:
        if seeds.exists() and not seeds.is_dir():
            seeds.chmod(0o644)  # so tmp_path can be cleaned up


# ----------------------------------------------------------------------------------------------
# Configs. Each case returns (the arguments after the command, the parts the error line holds).
# ----------------------------------------------------------------------------------------------

CONFIG_CASES: dict[str, Callable[[Workspace], tuple[list[str], list[str]]]] = {}


def config_case(name: str):
    def register(make):
        CONFIG_CASES[name] = make
        return make

    return register


def _edited(ws: Workspace, *expected: str, **dotted: object) -> tuple[list[str], list[str]]:
    config = ws.config(**dotted)
    return ["--config", str(config)], [str(config), *expected]


@config_case("unknown-top-level-key")
def _(ws):
    return _edited(ws, "unknown key 'iteratons'", "did you mean 'iterations'?", iteratons=2)


@config_case("unknown-nested-key")
def _(ws):
    return _edited(
        ws,
        "unknown key 'generation.new_per_iteraton'",
        "did you mean 'generation.new_per_iteration'?",
        generation__new_per_iteraton=5,
    )


@config_case("unknown-key-in-a-server")
def _(ws):
    return _edited(
        ws,
        "unknown key 'servers.teacher.max_concurency'",
        "did you mean 'servers.teacher.max_concurrency'?",
        servers__teacher__max_concurency=8,
    )


@config_case("missing-required-key")
def _(ws):
    return _edited(ws, "missing required key 'seed_data'", seed_data=DELETE)


@config_case("iterations-a-string")
def _(ws):
    return _edited(ws, "key 'iterations'", "valid integer", "'three'", iterations="three")


@config_case("tau-a-list")
def _(ws):
    return _edited(ws, "key 'discrimination.tau'", "valid number", discrimination__tau=[1, 2])


@config_case("section-a-number")
def _(ws):
    return _edited(ws, "key 'generation'", "valid dictionary", generation=5)


@config_case("new-per-iteration-zero")
def _(ws):
    return _edited(ws, "key 'generation.new_per_iteration'", "greater than or equal to 1", generation__new_per_iteration=0)


@config_case("new-per-iteration-negative")
def _(ws):
    return _edited(ws, "key 'generation.new_per_iteration'", "(got -5)", generation__new_per_iteration=-5)


@config_case("iterations-zero")
def _(ws):
    return _edited(ws, "key 'iterations'", "greater than or equal to 1", iterations=0)


@config_case("seed-limit-zero")
def _(ws):
    return _edited(ws, "key 'seed_limit'", "greater than or equal to 1", seed_limit=0)


@config_case("hard-ratio-below-0")
def _(ws):
    return _edited(ws, "key 'generation.hard_ratio'", "greater than or equal to 0", generation__hard_ratio=-0.1)


@config_case("hard-ratio-above-1")
def _(ws):
    return _edited(ws, "key 'generation.hard_ratio'", "less than or equal to 1", generation__hard_ratio=1.5)


@config_case("rouge-threshold-zero")
def _(ws):
    return _edited(ws, "key 'generation.rouge_threshold'", "greater than 0", generation__rouge_threshold=0)


@config_case("rouge-threshold-above-1")
def _(ws):
    return _edited(ws, "key 'generation.rouge_threshold'", "less than or equal to 1", generation__rouge_threshold=1.01)


@config_case("max-tokens-zero")
def _(ws):
    return _edited(ws, "key 'roles.teacher.max_tokens'", "greater than or equal to 1", roles__teacher__max_tokens=0)


@config_case("temperature-above-2")
def _(ws):
    return _edited(ws, "key 'roles.generator.temperature'", roles__generator__temperature=3)


@config_case("port-out-of-range")
def _(ws):
    return _edited(ws, "key 'servers.teacher.port'", servers__teacher__port=70000)


@config_case("referee-names-an-unknown-server")
def _(ws):
    return _edited(
        ws, "roles.referee.server: no server named 'teachr'", "did you mean 'teacher'?", roles__referee__server="teachr"
    )


@config_case("student-server-external")
def _(ws):
    return _edited(ws, "servers.student.engine", "vllm or transformers", servers__student__engine="external")


@config_case("external-server-without-model-name")
def _(ws):
    return _edited(
        ws,
        "servers.teacher",
        "needs served_model_name",
        servers__teacher__engine="external",
        servers__teacher__model=DELETE,
        servers__teacher__base_urls=["http://127.0.0.1:9/v1"],
    )


@config_case("missing-model-path")
def _(ws):
    missing = ws.root / "no-such-model"
    config = ws.config(servers__teacher__model=str(missing))
    return ["--config", str(config)], ["servers.teacher.model", f"{missing} does not exist"]


@config_case("model-path-is-a-file")
def _(ws):
    model_file = ws.write("model.bin", b"not a directory")
    config = ws.config(servers__student__model=str(model_file))
    return ["--config", str(config)], ["servers.student.model", f"{model_file} is a file"]


@config_case("unset-api-key-variable")
def _(ws):
    config = ws.config(servers__teacher__api_key_env=UNSET_VARIABLE)
    return ["--config", str(config)], ["servers.teacher.api_key_env", f"environment variable {UNSET_VARIABLE} is not set"]


@config_case("config-file-missing")
def _(ws):
    missing = ws.root / "no-such-config.yaml"
    return ["--config", str(missing)], [f"{missing}: config file not found"]


@config_case("config-path-is-a-directory")
def _(ws):
    # load_config says "<dir>: cannot read config file: ... Is a directory"; click must let it get there.
    directory = ws.root / "config-dir.yaml"
    directory.mkdir()
    return ["--config", str(directory)], [f"{directory}: cannot read config file"]


@config_case("config-file-without-read-permission")
def _(ws):
    locked = ws.config("locked.yaml")
    locked.chmod(0)
    if not os.access(locked, os.R_OK):
        return ["--config", str(locked)], [f"{locked}: cannot read config file", "Permission denied"]
    locked.chmod(0o644)
    reason = (
        f"chmod 000 does not stop this user (uid {os.getuid()}) from reading {locked}: the unreadable-config "
        "case includes a directory instead (a file that exists but cannot be read)"
    )
    print(reason)
    warnings.warn(reason, stacklevel=2)
    directory = ws.root / "part.yaml"
    directory.mkdir()
    config = ws.write("top.yaml", "include: part.yaml\n")
    return ["--config", str(config)], [f"{directory}: cannot read config file (included from {config})"]


@config_case("config-not-utf8")
def _(ws):
    good = ws.config().read_bytes()
    config = ws.write("latin1.yaml", good + b"# r\xe9sum\xe9\n")
    line = len(good.splitlines()) + 1
    return ["--config", str(config)], [f"{config}:{line}: not valid UTF-8"]


@config_case("yaml-syntax-error-on-line-3")
def _(ws):
    config = ws.write("syntax.yaml", f"run_dir: {ws.run_dir}\nseed_data: {ws.seeds}\niterations: 1: 2\nservers: {{}}\n")
    return ["--config", str(config)], [f"{config}:3: YAML syntax error"]


@config_case("top-level-a-list")
def _(ws):
    config = ws.write("list.yaml", "- run_dir: run\n- iterations: 2\n")
    return ["--config", str(config)], [f"{config}: top level must be a mapping", "not list"]


@config_case("top-level-a-string")
def _(ws):
    config = ws.write("text.yaml", "just some text\n")
    return ["--config", str(config)], [f"{config}: top level must be a mapping", "not str"]


@config_case("include-cycle")
def _(ws):
    ws.config("base.yaml")
    a = ws.write("a.yaml", "include: [base.yaml, b.yaml]\n")
    ws.write("b.yaml", "include: a.yaml\niterations: 2\n")
    return ["--config", str(a)], ["include cycle", str(ws.root / "a.yaml"), str(ws.root / "b.yaml")]


@config_case("include-missing-file")
def _(ws):
    config = ws.write("top.yaml", "include: [nowhere.yaml]\n")
    return ["--config", str(config)], [f"{ws.root / 'nowhere.yaml'}: config file not found (included from {config})"]


@config_case("include-not-a-path")
def _(ws):
    config = ws.write("top.yaml", "include: 5\n")
    return ["--config", str(config)], [f"{config}: include: must be a file path"]


@config_case("bad-key-in-an-included-file")
def _(ws):
    ws.config("base.yaml")
    part = ws.write("part.yaml", "generation:\n  hard_ratoi: 0.3\n")
    config = ws.write("top.yaml", "include: [base.yaml, part.yaml]\n")
    return ["--config", str(config)], [f"{part}: unknown key 'generation.hard_ratoi'", "'generation.hard_ratio'"]


@config_case("set-without-equals")
def _(ws):
    return ["--config", str(ws.config()), "--set", "iterations"], ["--set 'iterations'", "expected KEY=VALUE"]


@config_case("set-value-out-of-range")
def _(ws):
    return ["--config", str(ws.config()), "--set", "generation.hard_ratio=2"], ["--set: key 'generation.hard_ratio'"]


@config_case("set-into-a-non-mapping")
def _(ws):
    return ["--config", str(ws.config()), "--set", "iterations.count=2"], ["--set iterations.count", "not a mapping"]


@pytest.mark.parametrize("make", list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_bad_config(ws: Workspace, make: Callable):
    args, expected = make(ws)
    _check_case(ws, ["run"], args, expected)


# ----------------------------------------------------------------------------------------------
# The other commands give the same one-line error
# ----------------------------------------------------------------------------------------------


def _seed_case(case_id: str) -> Callable[[Workspace], tuple[list[str], list[str]]]:
    _, name, content, expected = next(case for case in SEED_CONTENT_CASES if case[0] == case_id)

    def make(ws: Workspace):
        seeds = ws.write(name, content)
        return ["--config", str(ws.config(seed_data=str(seeds)))], [part.format(path=seeds) for part in expected]

    return make


def _seed_path_case(make_path: Callable) -> Callable[[Workspace], tuple[list[str], list[str]]]:
    def make(ws: Workspace):
        seeds, expected = make_path(ws)
        return ["--config", str(ws.config(seed_data=str(seeds)))], expected

    return make


REPRESENTATIVE = {
    "bad-json-on-line-3": _seed_case("bad-json-on-line-3"),
    "non-utf8-bytes-on-line-2": _seed_case("non-utf8-bytes-on-line-2"),
    "empty-file": _seed_case("empty-file"),
    **{
        name: CONFIG_CASES[name]
        for name in ("unknown-nested-key", "hard-ratio-above-1", "missing-model-path", "unset-api-key-variable", "include-cycle")
    },
}


@pytest.mark.parametrize("command", [["iteration"], ["stage", "imitation"]], ids=" ".join)
@pytest.mark.parametrize("make", list(REPRESENTATIVE.values()), ids=list(REPRESENTATIVE))
def test_iteration_and_stage_commands(ws: Workspace, command: list[str], make: Callable):
    args, expected = make(ws)
    _check_case(ws, command, args, expected)


CONFIG_ONLY = ["unknown-nested-key", "iterations-a-string", "rouge-threshold-zero", "yaml-syntax-error-on-line-3", "include-cycle", "config-file-missing"]


@pytest.mark.parametrize("command", [["status"], ["config"], ["doctor"]], ids=" ".join)
@pytest.mark.parametrize("case_id", CONFIG_ONLY)
def test_commands_that_only_read_the_config(ws: Workspace, command: list[str], case_id: str):
    args, expected = CONFIG_CASES[case_id](ws)
    _check_case(ws, command, args, expected)


# ----------------------------------------------------------------------------------------------
# A run directory that already exists is left byte-for-byte unchanged
# ----------------------------------------------------------------------------------------------


def _existing_run(ws: Workspace) -> None:
    """A started run whose Cache Pool is not written yet, so the seed file is still read."""
    run = ws.run_dir
    (run / "logs").mkdir(parents=True)
    (run / "iter_1").mkdir()
    (run / "state.json").write_text(json.dumps({"iteration": 1, "completed": [], "stage_seconds": {}}, indent=2) + "\n")
    (run / "config.yaml").write_text(yaml.safe_dump(ws.base_data()))
    (run / "teacher_answers.jsonl").write_text('{"id": "seed-0", "answer": "Red, yellow and blue."}\n')
    (run / "logs" / "lion-local.log").write_text("12:00:00 INFO lion_local.stages.loop: ==== 1/imitation\n")
    (run / "iter_1" / "sft_progress.json").write_text('{"step": 3, "max_steps": 10}\n')
    assert not (run / "iter_1" / "cache_pool.jsonl").exists()


EXISTING_RUN_CASES = {
    **{name: _seed_case(name) for name in ("bad-json-on-line-3", "duplicate-instruction-and-input", "empty-file", "instruction-over-1-MB")},
    "seed-path-is-a-directory": _seed_path_case(_seed_directory),
    **{
        name: CONFIG_CASES[name]
        for name in (
            "unknown-nested-key",
            "new-per-iteration-zero",
            "missing-model-path",
            "unset-api-key-variable",
            "include-cycle",
            "yaml-syntax-error-on-line-3",
        )
    },
}


@pytest.mark.parametrize("command", [["run"], ["iteration"], ["stage", "imitation"]], ids=" ".join)
@pytest.mark.parametrize("make", list(EXISTING_RUN_CASES.values()), ids=list(EXISTING_RUN_CASES))
def test_existing_run_directory_is_left_unchanged(ws: Workspace, command: list[str], make: Callable):
    _existing_run(ws)
    args, expected = make(ws)
    before = _snapshot(ws.root)
    run_before = _snapshot(ws.run_dir)
    assert len(run_before) == 7
    _assert_one_line_error(_invoke([*command, *args]), expected)
    assert _snapshot(ws.run_dir) == run_before, "the run directory changed"
    assert _snapshot(ws.root) == before, "files under the workspace changed"


# ----------------------------------------------------------------------------------------------
# Real processes: the real exit code, and stderr is exactly the one line
# ----------------------------------------------------------------------------------------------

PROCESS_CASES = [
    (["run"], "bad-json-on-line-3"),
    (["run"], "unknown-nested-key"),
    (["iteration"], "missing-model-path"),
    (["stage", "imitation"], "include-cycle"),
]


def test_real_processes_exit_2_with_one_line(tmp_path: Path):
    makers = {**CONFIG_CASES, "bad-json-on-line-3": _seed_case("bad-json-on-line-3")}
    env = {key: value for key, value in os.environ.items() if key != UNSET_VARIABLE}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = []
    for index, (command, case_id) in enumerate(PROCESS_CASES):
        root = tmp_path / f"case{index}"
        root.mkdir()
        ws = Workspace(root)
        for name in ("teacher", "student"):
            stand_in_model(ws.model(name))
        ws.seeds.write_bytes(GOOD_JSONL)
        args, expected = makers[case_id](ws)
        in_process = _assert_one_line_error(_invoke([*command, *args]), expected)
        before = _snapshot(root)
        process = subprocess.Popen(
            [sys.executable, "-m", "lion_local", *command, *args],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((case_id, ws, before, in_process, process))
    for case_id, ws, before, in_process, process in started:
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 2, (case_id, process.returncode, stderr)
        assert stdout == "", (case_id, stdout)
        assert stderr == in_process + "\n", (case_id, stderr)  # exactly one line, the same as in-process
        assert not ws.run_dir.exists(), case_id
        assert _snapshot(ws.root) == before, case_id
