"""The PNG plots of `lion-local report`, one function per plot, each drawn from a RunReport.

Each plot function returns a figure, or None when the run has no data for it; make_plots writes
those that have data under <run_dir>/plots/.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lion_local.commands.report import LABELS, RunReport, nll_of
from lion_local.stages.role_calls import ROLE_STAGES

if TYPE_CHECKING:
    from matplotlib.figure import Figure



def make_plots(report: RunReport, directory: Path) -> list[Path]:
    """Write every plot that has data, in this order; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    directory.mkdir(parents=True, exist_ok=True)
    # (file name, the function that draws it or returns None without data, whether its first axes
    # counts whole numbers of instructions, calls or replies). The file names are this module's own:
    # lion_local.run.layout names only the folder (RunDir.plots).
    plots = (
        ("gaps.png", gaps_plot, True),
        ("likelihood_gaps.png", likelihood_gaps_plot, True),
        ("labels.png", labels_plot, False),
        ("scores.png", scores_plot, False),
        ("pools.png", pools_plot, True),
        ("generation.png", generation_plot, True),
        ("cost.png", cost_plot, True),  # the first panel counts calls
        ("evaluation.png", evaluation_plot, False),
        ("referee.png", referee_plot, False),
        ("likelihood.png", likelihood_plot, False),
    )
    written = []
    for name, plot, counts in plots:
        figure = plot(report)
        if figure is not None:
            written.append(_save(figure, directory / name, counts))
    return written


def _subplots(*args, **kwargs):
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _save(figure: Figure, path: Path, counts: bool) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if counts:
        for axes in figure.axes[:1]:
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def gaps_plot(report: RunReport) -> Figure | None:
    """gaps.png: the teacher-student gap histogram, one series per iteration the referee judged, and tau."""
    judged = [it for it in report.judged if it.report.get("signal", "referee") == "referee"]
    if not judged:
        return None
    figure, axes = _subplots(figsize=(8, 4.5))
    width = 0.8 / len(judged)
    for index, it in enumerate(judged):
        bins = it.report["scores"]["gap_histogram"]
        axes.bar([b["from"] + 0.1 + index * width for b in bins], [b["count"] for b in bins], width=width,
                 align="edge", label=f"iteration {it.iteration}")
    tau = report_tau(report)
    if tau is not None:
        axes.axvline(tau, color="black", linestyle="--", linewidth=1, label=f"tau = {tau:g} (hard at or above)")
    axes.set(title="Teacher minus student score per instruction",
             xlabel="gap (referee score points, teacher - student)", ylabel="instructions")
    axes.legend()
    return figure


def likelihood_gaps_plot(report: RunReport) -> Figure | None:
    """likelihood_gaps.png: the student's NLL per token of each Cache Pool instruction's teacher answer
    (discrimination.signal likelihood), one series per iteration, with each iteration's threshold."""
    measured = [it for it in report.judged if it.report.get("likelihood_gaps")]
    if not measured:
        return None
    figure, axes = _subplots(figsize=(8, 4.5))
    for it in measured:
        gaps = it.report["likelihood_gaps"]
        bins = gaps["nll_histogram"]
        line = axes.stairs([b["count"] for b in bins], [b["from"] for b in bins] + [bins[-1]["to"]] if bins else [0],
                           label=f"iteration {it.iteration}")
        if gaps["threshold"] is not None:
            axes.axvline(gaps["threshold"], color=line.get_edgecolor(), linestyle="--", linewidth=1,
                         label=f"iteration {it.iteration}: hard above {gaps['threshold']:.2f} "
                               f"(quantile {gaps['likelihood_quantile']:g})")
    axes.set(title="Student NLL of the teacher's answer per Cache Pool instruction",
             xlabel="gap: mean NLL per answer token (nats)", ylabel="instructions")
    axes.legend(fontsize="small")
    return figure


def labels_plot(report: RunReport) -> Figure | None:
    """labels.png: the hard / easy / unjudged shares of the Cache Pool per judged iteration."""
    judged = report.judged
    if not judged:
        return None
    figure, axes = _subplots(figsize=(7, 4.5))
    bottom = [0.0] * len(judged)
    for label, colour in zip(LABELS, ("tab:red", "tab:green", "tab:gray")):
        shares = [100.0 * it.report["labels"][label] / max(1, sum(it.report["labels"].values())) for it in judged]
        axes.bar([it.label for it in judged], shares, bottom=bottom, label=label, color=colour)
        bottom = [b + s for b, s in zip(bottom, shares)]
    axes.set(title="Cache Pool instructions by label", xlabel="iteration", ylabel="share of the Cache Pool (%)",
             ylim=(0, 100))
    axes.legend(bbox_to_anchor=(1.02, 1), loc="upper left")
    return figure


def scores_plot(report: RunReport) -> Figure | None:
    """scores.png: the teacher's and the student's mean referee score per judged iteration."""
    judged = report.judged
    if not judged:
        return None
    figure, axes = _subplots(figsize=(7, 4.5))
    for key, label in (("mean_teacher", "teacher"), ("mean_student", "student")):
        axes.plot([it.label for it in judged], [it.report["scores"][key] for it in judged], marker="o", label=label)
    axes.set(title="Mean referee score per iteration", xlabel="iteration", ylabel="mean score (1-10)")
    axes.legend()
    return figure


def pools_plot(report: RunReport) -> Figure | None:
    """pools.png: the Train Pool, the Cache Pool and the generated instructions per iteration."""
    if not report.iterations:
        return None
    figure, axes = _subplots(figsize=(8, 4.5))
    names = [it.label for it in report.iterations]
    width = 0.27
    for index, key in enumerate(("train", "cache", "generated")):
        values = [it.report.get("pools", {}).get(key, 0) for it in report.iterations]
        axes.bar([i + (index - 1) * width for i in range(len(names))], values, width=width, label=f"{key}")
    axes.set_xticks(range(len(names)), names)
    axes.set(title="Pool sizes per iteration", xlabel="iteration", ylabel="instructions")
    axes.legend(["Train Pool", "Cache Pool", "generated (accepted)"])
    return figure


def generation_plot(report: RunReport) -> Figure | None:
    """generation.png: the generator's replies accepted per side and rejected per reason, per iteration."""
    generating = report.generating
    if not generating:
        return None
    figure, axes = _subplots(figsize=(8, 4.5))
    reasons = sorted({r for it in generating for r in it.report["generation"].get("rejected", {})})
    series = [(f"accepted {side}", [it.report["generation"]["accepted"].get(side, 0) for it in generating])
              for side in ("hard", "easy")]
    series += [(f"rejected: {r}", [it.report["generation"]["rejected"].get(r, 0) for it in generating]) for r in reasons]
    bottom = [0] * len(generating)
    for label, values in series:
        axes.bar([it.label for it in generating], values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.set(title="Generator replies: accepted per side, rejected per reason", xlabel="iteration",
             ylabel="generator replies")
    axes.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return figure


def cost_plot(report: RunReport) -> Figure | None:
    """cost.png: calls, tokens and seconds per role and stage, one panel each, one series per iteration."""
    if not report.iterations:
        return None
    figure, panels = _subplots(1, 3, figsize=(14, 4.5))
    pairs = [(role, stage) for role, stage in ROLE_STAGES
             if any(it.usage(role, stage).get("calls") for it in report.iterations)]
    labels = [f"{role}\n{stage}" for role, stage in pairs]
    width = 0.8 / len(report.iterations)
    for axes, (title, unit, value) in zip(panels, (
        ("Calls", "calls", lambda u: u.get("calls", 0)),
        ("Tokens", "tokens (prompt + completion)", lambda u: u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)),
        ("Time in calls", "seconds (summed over calls)", lambda u: u.get("seconds", 0.0)),
    )):
        for index, it in enumerate(report.iterations):
            axes.bar([i + index * width for i in range(len(pairs))], [value(it.usage(r, s)) for r, s in pairs],
                     width=width, label=it.label)
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(pairs))], labels, fontsize="small")
        axes.set(title=f"{title} per role and stage", xlabel="role and stage", ylabel=unit)
    panels[0].legend()
    return figure


def evaluation_plot(report: RunReport) -> Figure | None:
    """evaluation.png: the student's score as a percentage of the teacher's, per evaluated checkpoint."""
    scored = [e for e in report.evaluations if e.get("relative_score") is not None]
    if not scored:
        return None
    figure, axes = _subplots(figsize=(7, 4.5))
    axes.plot([e["checkpoint"] for e in scored], [e["relative_score"] for e in scored], marker="o",
              label="student / teacher")
    axes.axhline(100, color="black", linestyle="--", linewidth=1, label="the teacher (100%)")
    axes.set(title="Relative score per checkpoint (judge scores, both orders)", xlabel="checkpoint",
             ylabel="student total as % of teacher total")
    axes.legend()
    return figure


def referee_plot(report: RunReport) -> Figure | None:
    """referee.png: the referee on its control pairs per iteration, with the bounds that stop a discrimination."""
    checked = [it for it in report.judged if (it.report.get("referee_check") or {}).get("pairs")]
    if not checked:
        return None
    figure, axes = _subplots(figsize=(10, 4.5))
    names = [it.label for it in checked]
    for key, label in (("accuracy", "control accuracy (prefers the real answer)"),
                       ("position_consistent_share", "position-consistent share"),
                       ("unjudged_share", "unjudged share")):
        axes.plot(names, [it.report["referee_check"].get(key) for it in checked], marker="o", label=label)
    bounds = (report_config(report) or {}).get("discrimination", {}).get("referee_check", {})
    if "min_control_accuracy" in bounds:
        axes.axhline(bounds["min_control_accuracy"], color="tab:blue", linestyle="--", linewidth=1,
                     label=f"min control accuracy {bounds['min_control_accuracy']:g}")
    if "max_unjudged_share" in bounds:
        axes.axhline(bounds["max_unjudged_share"], color="tab:green", linestyle=":", linewidth=1,
                     label=f"max unjudged share {bounds['max_unjudged_share']:g}")
    axes.axhline(0.5, color="gray", linewidth=0.8, label="a coin (0.5)")
    axes.set(title="Referee on control pairs (real vs degraded answer)", xlabel="iteration",
             ylabel="share of control pairs", ylim=(0, 1.05))
    axes.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return figure


def likelihood_plot(report: RunReport) -> Figure | None:
    """likelihood.png: each checkpoint's NLL per token of the teacher's answers, and the teacher's own."""
    measured = [e for e in report.evaluations if nll_of(e) is not None]
    if not measured:
        return None
    figure, axes = _subplots(figsize=(7, 4.5))
    names = [e["checkpoint"] for e in measured]
    axes.plot(names, [nll_of(e) for e in measured], marker="o", label="student: evaluation questions")
    if any(nll_of(e, "held_out") is not None for e in measured):
        axes.plot(names, [nll_of(e, "held_out") for e in measured], marker="s", label="student: held-out seeds")
    teacher = next((nll_of(e, who="teacher") for e in measured if nll_of(e, who="teacher") is not None), None)
    if teacher is not None:
        axes.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"the teacher itself ({teacher:.2f})")
    axes.set(title="NLL of the teacher's answers per checkpoint (lower: closer to the teacher)",
             xlabel="checkpoint", ylabel="mean NLL per answer token (nats)")
    axes.legend()
    return figure


def report_config(report: RunReport) -> dict | None:
    """The run's config.yaml as a mapping, or None if it cannot be read."""
    import yaml

    try:
        config = yaml.safe_load(report.run.config_yaml.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def report_tau(report: RunReport) -> float | None:
    """The run's discrimination.tau from its config.yaml, or None if it cannot be read."""
    try:
        return float(report_config(report)["discrimination"]["tau"])
    except (KeyError, TypeError, ValueError):
        return None
