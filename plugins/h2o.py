"""H2O evictor: heavy hitters by accumulated attention, plus a window of recent tokens."""

from dataclasses import dataclass

import squeezekit


@dataclass
class H2O(squeezekit.TokenEvictor):
    """H2O: heavy hitters (accumulated attention) plus the most recent tokens."""

    name = "h2o"
    needs = squeezekit.Stat.ATTENTION
    #: share of a layer's budget for heavy hitters; the rest (at least `window`) is the recent window
    heavy_ratio: float = 0.5
    #: the fewest recent tokens a layer keeps
    window: int = 8

    def __post_init__(self):
        squeezekit.check("heavy_ratio", self.heavy_ratio, 0 <= self.heavy_ratio <= 1, "must be in [0, 1]")
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")

    def floor(self):
        return self.window

    def score(self, view):
        # a head keeps its heavy_ratio share of its own budget for heavy hitters, the rest for its recent window
        budget = view.per_head_budget()
        recent = (budget - (self.heavy_ratio * budget).round().long()).clamp(min=self.window)
        protected = view.recent(recent)
        return view.attention.float().masked_fill(protected, float("inf"))


@squeezekit.hookimpl
def register_evictors(register):
    register(H2O)
