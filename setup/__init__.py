"""Data preparation and tokenizer training scripts, run as ``python -m setup.<script>``.

- ``setup.prepare_data``: jsonl corpora (a Hugging Face dataset, or the embedded default corpus
  built from the Python sources installed on this machine);
- ``setup.train_tokenizer``: a SentencePiece model trained on jsonl text.

This module holds what they share: a one-line progress display on stderr.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _format(amount: float) -> str:
    return f"{amount:,}" if isinstance(amount, int) else f"{amount:,.1f}"


class Progress:
    """A progress line rewritten in place on stderr (at most every ``interval`` seconds; when
    stderr is not a terminal, a plain line every ``log_interval`` seconds).

    ``update(done)`` sets the amount done; ``close()`` prints the final line. With a ``total``
    the line shows a bar and a percentage.
    """

    def __init__(
        self,
        label: str,
        total: Optional[float] = None,
        unit: str = "",
        interval: float = 0.2,
        log_interval: float = 30.0,
        stream: Optional[TextIO] = None,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.interval, self.log_interval = interval, log_interval
        self.stream = stream if stream is not None else sys.stderr
        self.done: float = 0
        self.note = ""
        self._interactive = getattr(self.stream, "isatty", lambda: False)()
        self._started = time.monotonic()
        self._last_shown = float("-inf")

    def update(self, done: float, note: str = "") -> None:
        self.done, self.note = done, note
        now = time.monotonic()
        # Redrawing only works on a terminal; a log file gets a new line now and then.
        period = self.interval if self._interactive else self.log_interval
        if now - self._last_shown >= period:
            self._last_shown = now
            self._show(end="" if self._interactive else "\n")

    def _show(self, end: str) -> None:
        elapsed = time.monotonic() - self._started
        amount = f"{_format(self.done)}{self.unit}"
        if self.total:
            fraction = min(1.0, self.done / self.total)
            bar = "#" * int(fraction * 20)
            line = f"{self.label} [{bar:<20}] {fraction:4.0%} {amount}/{_format(self.total)}{self.unit}"
        else:
            line = f"{self.label} {amount}"
        note = f" {self.note}" if self.note else ""
        redraw = "\r" if self._interactive else ""
        clear_rest = "\033[K" if self._interactive else ""
        self.stream.write(f"{redraw}{line}{note} ({elapsed:.1f}s){clear_rest}{end}")
        self.stream.flush()

    def close(self) -> None:
        self._show(end="\n")
