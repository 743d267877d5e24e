"""Imports run one way: commands -> stages -> roles -> endpoints -> run -> config -> serving.

Pure file reading (every `import` and `from ... import` of lion_local/ and serving/, at any
depth, read with ast). A module may import only modules of its own layer or of a lower one:

    cli (cli.py, cli_options.py, __main__.py)
    commands/
    stages/
    smoke/        the tiny and real test models (built from the roles' own prompts)
    roles/
    endpoints/
    run/          the run model: paths, state, journals, identity, records
    config        config*.py, trainer_settings.py
    base          errors.py, offline.py, input_files.py, the package itself
    serving/      imports nothing of lion_local

no module takes another module's private (underscore) name, and no two modules import each
other, not even through a lazy import inside a function. Each failure names the file, the line
and the import at fault (a circle: its modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS = ("serving", "base", "config", "run", "endpoints", "roles", "smoke", "stages", "commands", "cli")
BASE = {"lion_local", "lion_local.errors", "lion_local.offline", "lion_local.input_files", "lion_local.data"}
CONFIG = {"lion_local.config", "lion_local.config_schema", "lion_local.config_stages", "lion_local.trainer_settings"}
CLI = {"lion_local.cli", "lion_local.cli_options", "lion_local.__main__"}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of this project, or None for a module of another project."""
    top, _, rest = module.partition(".")
    if top == "serving":
        return "serving"
    if top != "lion_local":
        return None
    if module in BASE:
        return "base"
    if module in CONFIG:
        return "config"
    if module in CLI:
        return "cli"
    package = rest.partition(".")[0]
    if package in ("run", "endpoints", "roles", "smoke", "stages", "commands"):
        return package
    raise AssertionError(f"{module}: no layer; add it to tests/test_layers.py")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken) for each import of the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base, [alias.name for alias in node.names]))
    return found


def layer_problems(root: Path) -> list[str]:
    """Every import of lion_local/ and serving/ under `root` that runs upward or takes a private name."""
    problems = []
    for path in sorted([*root.glob("lion_local/**/*.py"), *root.glob("serving/**/*.py")]):
        here = module_name(path, root)
        own = LAYERS.index(layer_of(here))
        for line, target, names in imports_of(path, root):
            layer = layer_of(target)
            where = f"{path.relative_to(root)}:{line}: {here} imports {target}"
            if layer is not None and LAYERS.index(layer) > own:
                problems.append(f"{where}: the {layer_of(here)} layer may not import the {layer} layer above it")
            private = [name for name in names if name.startswith("_") and not name.startswith("__")]
            if layer is not None and target != here and private:
                problems.append(f"{where}: takes the private name(s) {', '.join(private)}")
    return problems


def import_circles(root: Path) -> list[list[str]]:
    """Every set of modules of lion_local/ and serving/ that import each other in a loop (at any
    depth, lazy imports too), each sorted; an import of a package counts as one of its __init__."""
    paths = sorted([*root.glob("lion_local/**/*.py"), *root.glob("serving/**/*.py")])
    modules = {module_name(path, root) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        here = module_name(path, root)
        targets = set()
        for _, target, names in imports_of(path, root):
            targets |= {f"{target}.{name}" for name in names if f"{target}.{name}" in modules}
            targets.add(target)
        graph[here] = {target for target in targets if target in modules and target != here}
    circles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_two_modules_import_each_other():
    assert import_circles(ROOT) == []


def test_the_circle_check_finds_a_lazy_circle(tmp_path: Path):
    write(tmp_path, "lion_local/__init__.py", "")
    write(tmp_path, "lion_local/commands/__init__.py", "")
    write(tmp_path, "lion_local/commands/report.py", "def write():\n    from lion_local.commands.report_plots import plots\n")
    write(tmp_path, "lion_local/commands/report_plots.py", "from lion_local.commands import report\n")
    assert import_circles(tmp_path) == [["lion_local.commands.report", "lion_local.commands.report_plots"]]


def test_every_import_runs_down_the_layers():
    problems = layer_problems(ROOT)
    assert not problems, "imports that run upward:\n" + "\n".join(problems)


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_the_check_names_an_upward_import_a_private_name_and_serving_reaching_up(tmp_path: Path):
    write(tmp_path, "lion_local/__init__.py", "")
    write(tmp_path, "lion_local/run/__init__.py", "")
    write(tmp_path, "lion_local/run/layout.py", "def paths():\n    from lion_local.stages.loop import execute\n")
    write(tmp_path, "lion_local/stages/__init__.py", "")
    write(tmp_path, "lion_local/stages/loop.py", "from .judging import _pending\nfrom lion_local.run import layout\n")
    write(tmp_path, "lion_local/stages/judging.py", "def _pending():\n    pass\n")
    write(tmp_path, "serving/__init__.py", "import lion_local.errors\n")
    problems = layer_problems(tmp_path)
    assert problems == [
        "lion_local/run/layout.py:2: lion_local.run.layout imports lion_local.stages.loop: "
        "the run layer may not import the stages layer above it",
        "lion_local/stages/loop.py:1: lion_local.stages.loop imports lion_local.stages.judging: takes the private name(s) _pending",
        "serving/__init__.py:1: serving imports lion_local.errors: the serving layer may not import the base layer above it",
    ]


def test_downward_and_same_layer_imports_pass(tmp_path: Path):
    write(tmp_path, "lion_local/__init__.py", "")
    write(tmp_path, "lion_local/stages/__init__.py", "")
    write(tmp_path, "lion_local/stages/loop.py", "from lion_local.stages.judging import pending\nimport lion_local.config\nimport json\n")
    write(tmp_path, "lion_local/stages/judging.py", "from serving import spec\n")
    assert layer_problems(tmp_path) == []
