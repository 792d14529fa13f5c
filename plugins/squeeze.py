"""SqueezeAttention allocator (ICLR 2025): cluster layers by importance, squeeze the least important group.

Per sequence, KMeans (k=3) groups the layers by the cosine similarity of their hidden state before and after
attention. The group with the highest similarity (attention changed the least) gets ``p`` x the mean budget; the
tokens it frees go to the other layers. No layer gets more than it holds; what that cap frees flows back to the
others, so the total stays exact. Fewer than 3 distinct similarities: uniform.

``per="batch"`` (default) clusters the batch's mean importance once, so every sequence of a batch shares the same
layer shares and each layer's buffer is exactly as large as its budget; ``per="sequence"`` clusters each prompt on
its own (the paper's batch-1 behaviour), at the price of buffers sized for the largest budget in the batch.
A batch prefilled in micro-batches counts as one batch: its mean importance is the first micro-batch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import squeezekit
from squeezekit.budget import distribute

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Squeeze(squeezekit.LayerBudgetAllocator):
    """SqueezeAttention: KMeans(3) on layer importance; the least important group gets p x the mean budget."""

    name = "squeeze"
    #: the least important layer group gets p x the mean budget
    p: float = 0.4
    #: KMeans restarts
    n_init: int = 10
    #: KMeans seed
    random_state: int = 0
    #: cluster the batch's mean importance ("batch") or each sequence's ("sequence")
    per: Literal["batch", "sequence"] = "batch"

    @property
    def batch_level(self) -> bool:  # micro-batches of one batch share its allocation (see LayerBudgetAllocator)
        return self.per == "batch"

    def __post_init__(self):
        squeezekit.check("p", self.p, 0 < self.p <= 1, "must be in (0, 1]")
        squeezekit.check("n_init", self.n_init, self.n_init >= 1, "must be an integer >= 1")
        squeezekit.check("per", self.per, self.per in ("batch", "sequence"), "must be 'batch' or 'sequence'")

    def groups(self, importance: np.ndarray) -> np.ndarray | None:
        """Boolean mask of the least important group of one sequence's layers, or None if degenerate."""
        import numpy as np
        from sklearn.cluster import KMeans

        if np.unique(importance).size < 3:
            return None
        km = KMeans(n_clusters=3, n_init=self.n_init, random_state=self.random_state)
        labels = km.fit_predict(importance.reshape(-1, 1))
        return labels == int(np.argmax(km.cluster_centers_.ravel()))

    def allocate(self, request):
        import numpy as np
        import torch
        from threadpoolctl import threadpool_limits

        importance = request.importance.detach().double().cpu().numpy()
        n_layers = importance.shape[1]
        # A few dozen points: OpenMP threads would only contend with torch's own pool (7x slower on 2 cores).
        with threadpool_limits(limits=1, user_api="openmp"):
            if self.per == "batch":
                shares = [self.shares(importance.mean(axis=0))] * importance.shape[0]
            else:
                shares = [self.shares(row) for row in importance]
        totals = request.total.double().cpu().numpy()
        targets = np.stack(shares) * totals[:, None] / n_layers
        return distribute(torch.as_tensor(targets), request.total, request.floor, request.cap)

    def shares(self, importance: np.ndarray) -> np.ndarray:
        """Each layer's budget as a multiple of the mean budget (averaging 1)."""
        import numpy as np

        n_layers = importance.size
        out = np.ones(n_layers)
        squeezed = self.groups(importance)
        if squeezed is not None:
            out[squeezed] = self.p
            out[~squeezed] = (n_layers - squeezed.sum() * self.p) / (~squeezed).sum()
        return out


@squeezekit.hookimpl
def register_allocators(register):
    register(Squeeze)
