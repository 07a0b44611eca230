"""Stopping a long evaluation early, between batches, when the job is asked to stop.

Training sets a check with :func:`interruptible` around its periodic evaluation (a vote across
ranks on whether any received SIGTERM/SIGUSR1); the evaluation loops call :func:`check_interrupt`
before each batch, which raises :class:`EvaluationInterrupted` once the check says stop. Without
it, a preemption signal that arrives during an evaluation of many minutes would wait for the end
of the evaluation, past the grace period of most schedulers.

Under torchrun every rank must call the check equally often when it is a collective vote: they
do, since work shared out across ranks goes in rounds of one batch per rank
(``lingua.eval.my_share``), and the rest runs whole on every rank.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

_should_stop: Optional[Callable[[], bool]] = None


class EvaluationInterrupted(Exception):
    """Raised between evaluation batches when the check set by :func:`interruptible` says stop."""


@contextlib.contextmanager
def interruptible(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Within: evaluation loops ask ``should_stop()`` before every batch."""
    global _should_stop
    previous, _should_stop = _should_stop, should_stop
    try:
        yield
    finally:
        _should_stop = previous


def check_interrupt() -> None:
    """Raise :class:`EvaluationInterrupted` if a check is set and says stop; else nothing."""
    if _should_stop is not None and _should_stop():
        raise EvaluationInterrupted("evaluation interrupted: the job was asked to stop")
