"""Replies cut at max_tokens: counted per stage, and a warning when too many were.

A teacher answer cut at roles.teacher.max_tokens teaches the student to stop mid-sentence (or,
with imitation.drop_truncated_answers, is left out of training); a generator reply cut at its
length budget is dropped by generation.filters.drop_truncated. Either way a budget that is too
small costs data without failing, so each stage counts its truncated replies (its summary, the
iteration's report.json, `lion-local status` and `lion-local report`) and warns, naming the key
to raise, when their share passes the role's warn_truncated_share.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def truncated(records: list[dict]) -> int:
    """How many journaled replies ended at the length limit."""
    return sum(1 for record in records if record.get("finish_reason") == "length")


def truncation_warning(where: str, role: str, cut: int, total: int, share: float, key: str) -> str | None:
    """The warning for `cut` of `total` replies of `role` truncated, when their share is above `share`."""
    if not total or cut / total <= share:
        return None
    return (
        f"{where}: {cut} of {total} {role} replies ({cut / total:.0%}) were cut at the length limit, more than "
        f"roles.{role}.warn_truncated_share {share:g}; raise {key}"
    )


def warn_truncated(where: str, role: str, records: list[dict], share: float, key: str) -> int:
    """Log the truncation warning for `records` if due; return how many were truncated."""
    cut = truncated(records)
    warning = truncation_warning(where, role, cut, len(records), share, key)
    if warning is not None:
        logger.warning(warning)
    return cut
