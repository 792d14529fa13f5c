"""Does snapkv's decode rule cost the adaptive split its needles? ``squeezekit`` with snapkv patched (CPU check).

    python docs/results/head-split-smollm2-h200/keep_prompt.py MODE eval --sweep ...   (squeezekit's own arguments)

MODE ``oldest``: snapkv as bundled (while decoding, a full head drops its oldest token). MODE ``keep_prompt``:
while decoding, a full head drops its oldest *generated* token first, so the prompt tokens the prefill selected stay
until no generated token outside the window is left (the window stays protected).
"""

import sys

import torch
from squeezekit.plugins.snapkv import SnapKV

from squeezekit.cli import main

mode = sys.argv[1]
if mode == "keep_prompt":
    bundled = SnapKV.score
    prompt_len: dict[int, torch.Tensor] = {}

    def score(self, view):
        if view.window_queries is not None:  # prefill: as bundled; remember each row's prompt length
            prompt_len[view.layer_idx] = view.seen.clone()
            return bundled(self, view)
        p = prompt_len[view.layer_idx].view(-1, 1, 1)
        pos = view.positions.float()
        return torch.where(view.positions < p, 1e6 + pos, pos).masked_fill(view.recent(self.window), float("inf"))

    SnapKV.score = score
elif mode != "oldest":
    sys.exit(f"MODE: oldest or keep_prompt, not {mode!r}")
sys.exit(main(sys.argv[2:]))
