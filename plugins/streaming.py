"""StreamingLLM evictor: keep the first ``sinks`` tokens (attention sinks) and the most recent ones."""

from dataclasses import dataclass

import squeezekit


@dataclass
class Streaming(squeezekit.TokenEvictor):
    """StreamingLLM: attention sinks plus the most recent tokens."""

    name = "streaming"
    #: the first tokens of the prompt, always kept (attention sinks)
    sinks: int = 4
    #: the fewest recent tokens a layer keeps besides the sinks
    window: int = 8

    def __post_init__(self):
        squeezekit.check("sinks", self.sinks, self.sinks >= 0, "must be an integer >= 0")
        squeezekit.check("window", self.window, self.window >= 1, "must be an integer >= 1")

    def floor(self):
        return self.sinks + self.window

    def score(self, view):
        recency = view.positions.float()
        return recency.masked_fill(view.positions < self.sinks, float("inf"))


@squeezekit.hookimpl
def register_evictors(register):
    register(Streaming)
