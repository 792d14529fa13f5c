"""Sliding-window evictor: keep only the most recent tokens."""

from dataclasses import dataclass

import squeezekit


@dataclass
class SlidingWindow(squeezekit.TokenEvictor):
    """Sliding window: the most recent tokens only."""

    name = "sliding_window"
    #: the fewest tokens a layer keeps (the most recent ones)
    window: int = 8

    def __post_init__(self):
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")

    def floor(self):
        return self.window

    def score(self, view):
        return view.positions.float()


@squeezekit.hookimpl
def register_evictors(register):
    register(SlidingWindow)
