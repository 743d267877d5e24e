"""The PNG plots of `lion-local compare`, one function per plot, each drawn from a Comparison.

Each plot function returns a figure, or None (logging why) when no run has data for it;
make_plots writes those that have data under DIR/plots/, with one legend entry per run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from lion_local.commands.compare import (
    Comparison,
    checkpoint_label,
    checkpoint_order,
    column,
    hard_shares,
    nll_by_checkpoint,
    usage_totals,
)
from lion_local.stages.role_calls import ROLES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def make_plots(result: Comparison, directory: Path) -> list[Path]:
    """Write every plot that has data, in this order; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    directory.mkdir(parents=True, exist_ok=True)
    # The file names are this module's own, like lion_local.commands.report_plots'.
    plots = (("nll.png", nll_plot), ("hard_share.png", hard_share_plot), ("cost.png", cost_plot))
    written = []
    for name, plot in plots:
        figure = plot(result)
        if figure is not None:
            written.append(_save(figure, directory / name))
    return written


def _subplots(*args, **kwargs):
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _save(figure: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _value(value: float | None) -> float:
    return math.nan if value is None else value  # a gap in the line


def nll_plot(result: Comparison) -> Figure | None:
    """nll.png: each run's NLL per token of the teacher's answers per checkpoint; questions and held-out."""
    checkpoints = sorted({name for run in result.runs for name in run["evaluations"]}, key=checkpoint_order)
    measured = any(value is not None for run in result.runs for value in nll_by_checkpoint(run, "questions").values())
    if not measured:
        logger.info("nll.png left out: no run has likelihood results yet (lion-local evaluate writes them)")
        return None
    figure, panels = _subplots(1, 2, figsize=(12, 4.5), sharey=True)
    positions = range(len(checkpoints))
    for axes, (part, title) in zip(panels, (("questions", "evaluation questions"), ("held_out", "held-out seeds"))):
        for run in result.runs:
            nll = nll_by_checkpoint(run, part)
            axes.plot(positions, [_value(nll.get(name)) for name in checkpoints], marker="o", label=column(run))
        axes.set_xticks(positions, [checkpoint_label(name) for name in checkpoints])
        axes.set(title=f"NLL of the teacher's answers: {title}", xlabel="checkpoint",
                 ylabel="mean NLL per answer token (nats)")
    panels[0].legend()
    return figure


def hard_share_plot(result: Comparison) -> Figure | None:
    """hard_share.png: the share of the Cache Pool labelled hard per iteration, one series per run."""
    iterations = sorted({k for run in result.runs for k in hard_shares(run)})
    if not iterations:
        logger.info("hard_share.png left out: no run has an iteration report yet")
        return None
    figure, axes = _subplots(figsize=(8, 4.5))
    for run in result.runs:
        shares = hard_shares(run)
        axes.plot(iterations, [_value(shares.get(k)) for k in iterations], marker="o", label=column(run))
    axes.set_xticks(iterations, [f"iter {k}" for k in iterations])
    axes.set(title="Hard share of the Cache Pool per iteration", xlabel="iteration",
             ylabel="hard / Cache Pool", ylim=(0, 1.05))
    axes.legend()
    return figure


def cost_plot(result: Comparison) -> Figure | None:
    """cost.png: calls per role, summed over the run's iterations, one bar per run in each role's group."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _subplots(figsize=(9, 4.5))
    width = 0.8 / len(result.runs)
    for index, run in enumerate(result.runs):
        totals = usage_totals(run)
        axes.bar([i + index * width for i in range(len(ROLES))], [totals[role]["calls"] for role in ROLES],
                 width=width, label=column(run))
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(ROLES))], ROLES)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title="Calls per role (all iterations, final imitation included)", xlabel="role", ylabel="calls")
    axes.legend()
    return figure
