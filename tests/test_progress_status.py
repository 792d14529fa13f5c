"""`squeezekit.progress.status` while a bar is drawn on a terminal: its line goes above the bar, not into it."""

from __future__ import annotations

import io

from squeezekit.progress import progress, status


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_status_line_is_written_above_a_live_bar_not_into_it(monkeypatch):
    monkeypatch.delenv("SQUEEZEKIT_PROGRESS", raising=False)
    terminal = Terminal()
    with progress(3, "eval", "unit", stream=terminal) as bar:
        bar.update(1)
        drawn = terminal.getvalue()
        assert "eval" in drawn and not drawn.endswith("\n")  # the bar's line, the cursor still on it
        status("loading the model DIR", stream=terminal)
        written = terminal.getvalue()[len(drawn) :]
    before, line, after = written.partition("squeezekit: loading the model DIR\n")
    assert line and before.endswith("\r")  # the bar was cleared first: the line starts at the margin
    assert "eval" in after  # and the bar is drawn again below it
