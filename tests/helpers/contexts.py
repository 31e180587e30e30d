"""Feature contexts for the judge and report tests."""

from __future__ import annotations

from saeot.evaluation.contexts import Context


def ctx(token: str, left: str = "the ", right: str = " end", act: float = 1.0) -> Context:
    """One context: ``left`` + the marked ``token`` + ``right``, at activation ``act``."""
    return Context(left=left, token=token, right=right, activation=act)
