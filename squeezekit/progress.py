"""Progress of long work, on stderr: a live bar on a terminal, plain lines elsewhere (a log file, CI, a pipe).

Every long command reports through `progress`. On a terminal it is a tqdm bar. Off a terminal a bar would be
unreadable (carriage returns) and tqdm's ``disable=None`` would hide it entirely, so there it prints one line when
the work starts, then at most one every `EVERY` seconds, and one when it ends::

    squeezekit: sweep 3/40 units (7%), 1m12s elapsed, about 14m left: uniform+h2o@0.2 niah_single_1@1024:8

``SQUEEZEKIT_PROGRESS=0`` silences both (``1`` forces the lines even on a terminal). Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

#: seconds between two progress lines off a terminal
EVERY = 10.0
ENV = "SQUEEZEKIT_PROGRESS"


def _mode(stream: TextIO) -> str:
    """``bar``, ``lines`` or ``off``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes", "lines"):
        return "lines"
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def plural(n: int, word: str) -> str:
    """``1 document``, ``2 documents``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class Progress:
    """``total`` steps of work called ``desc``, counted in ``unit``s (see the module docstring). Use as a context
    manager or call `close`."""

    #: how many bars are drawn now: `status` writes its line above them, not into them
    live = 0

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "step",
        initial: int = 0,
        stream: TextIO | None = None,
        every: float | None = None,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream if stream is not None else sys.stderr
        self.mode = _mode(self.stream)
        self.every = EVERY if every is None else every
        self.note = ""
        self._start = self._last = time.monotonic()
        self._first = initial
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=False
            )
            Progress.live += 1
        elif self.mode == "lines":
            self._line(force=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_note(self, note: str) -> None:
        """What is being worked on now (shown after the counts)."""
        self.note = note
        if self._bar is not None:
            self._bar.set_postfix_str(note)  # shown now: it says what is being worked on

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            Progress.live -= 1
        elif self.mode == "lines" and self.n != self._printed:
            self._line(force=True)
        self.mode = "off"

    _printed = -1

    def _line(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every and self.n < self.total:
            return
        self._last = now
        self._printed = self.n
        elapsed = now - self._start
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"squeezekit: {self.desc} {self.n}/{self.total} {self.unit}s{share}, {_duration(elapsed)} elapsed"
        done = self.n - self._first
        if 0 < done and self.n < self.total:
            left = elapsed / done * (self.total - self.n)
            text += f", about {_duration(left)} left"
        if self.note:
            text += f": {self.note}"
        print(text, file=self.stream, flush=True)


def progress(total: int, desc: str, unit: str = "step", initial: int = 0, stream: TextIO | None = None) -> Progress:
    """A `Progress` of ``total`` ``unit``s (see the module docstring)."""
    return Progress(total, desc, unit, initial, stream)


def status(text: str, stream: TextIO | None = None) -> None:
    """One line of what is happening now (``squeezekit: loading the model ...``), on a terminal or off it, unless
    ``SQUEEZEKIT_PROGRESS=0``."""
    stream = stream if stream is not None else sys.stderr
    if _mode(stream) == "off":
        return
    if Progress.live:  # a bar is drawn: tqdm clears it, writes the line, draws it again (a print would land in it)
        from tqdm import tqdm

        tqdm.write(f"squeezekit: {text}", file=stream)
    else:
        print(f"squeezekit: {text}", file=stream, flush=True)


def quiet_transformers() -> None:
    """Turn off transformers' own progress bars (weight loading): squeezekit reports its own progress."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # an older or broken transformers: its bars are cosmetic
        pass
