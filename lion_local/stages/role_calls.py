"""Which role each stage calls, where those calls are journaled, and how many calls an item costs.

The one table behind `lion-local plan` (calls and tokens per stage and role), `lion-local report`
(its rows per role and stage), each iteration's report.json (usage per role) and `lion-local
status` (the reviews done). Each journal is named by its IterationDir (or RunDir) attribute in
lion_local.run.layout, which alone spells the file names.

    role       stages                      journals                        calls per item
    teacher    imitation, discrimination   RunDir.teacher_answers          1 per distinct instruction
    student    discrimination              student_answers, likelihoods    1 per Cache Pool instruction
    referee    discrimination              reviews (+ controls)            REVIEW_ORDERS per pair
    generator  generation                  generator_calls                 1 per reply

discrimination.signal decides which of them a discrimination calls (`discrimination_roles`):
referee: teacher, student (answers) and referee; likelihood: teacher and student (one prefill each,
journaled in likelihoods); none: no call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lion_local.run.layout import IterationDir, StageName
from lion_local.stages.judging import ORDERS

Role = Literal["teacher", "student", "referee", "generator"]

# The referee reviews each pair (a Cache Pool instruction, or a control pair) once in each order.
REVIEW_ORDERS = len(ORDERS)


@dataclass(frozen=True)
class RoleCalls:
    """One role's calls: the stages that make them and the files that journal them."""

    role: Role
    stages: tuple[StageName, ...]  # in loop order
    journals: tuple[str, ...] = ()  # IterationDir attributes: its calls on a stage's instructions
    control_journals: tuple[str, ...] = ()  # IterationDir attributes: its calls on the control pairs
    run_journal: str | None = None  # RunDir attribute of a run-wide journal (each record names its "stage")
    per_item: int = 1  # calls per instruction or pair, before retries


ROLE_CALLS: tuple[RoleCalls, ...] = (
    RoleCalls("teacher", ("imitation", "discrimination"), run_journal="teacher_answers"),
    RoleCalls("student", ("discrimination",), ("student_answers", "likelihoods")),
    RoleCalls("referee", ("discrimination",), ("reviews",), ("controls",), per_item=REVIEW_ORDERS),
    RoleCalls("generator", ("generation",), ("generator_calls",)),
)
CALLS: dict[str, RoleCalls] = {calls.role: calls for calls in ROLE_CALLS}
ROLES: tuple[Role, ...] = tuple(calls.role for calls in ROLE_CALLS)
# (role, stage) pairs that make calls, in the order of the loop.
ROLE_STAGES: tuple[tuple[Role, StageName], ...] = tuple((c.role, stage) for c in ROLE_CALLS for stage in c.stages)

# discrimination.signal -> the roles a discrimination calls under it.
SIGNAL_ROLES: dict[str, tuple[Role, ...]] = {
    "referee": ("teacher", "student", "referee"),
    "likelihood": ("teacher", "student"),
    "none": (),
}


def discrimination_roles(signal: str) -> tuple[Role, ...]:
    """The roles a discrimination calls under discrimination.signal `signal`."""
    return SIGNAL_ROLES[signal]


def stage_roles(stage: StageName) -> tuple[Role, ...]:
    """The roles a stage can call (under any signal), in table order."""
    return tuple(calls.role for calls in ROLE_CALLS if stage in calls.stages)


def call_journals(directory: IterationDir, role: str, controls: bool = True) -> list[Path]:
    """The files of an iteration directory that journal a role's calls (the teacher's: none, its
    journal is run-wide), with the control pairs' unless `controls` is False."""
    calls = CALLS[role]
    return [getattr(directory, name) for name in calls.journals + (calls.control_journals if controls else ())]
