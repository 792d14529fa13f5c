"""SqueezeAttention allocator (ICLR 2025): cluster layers by importance, squeeze the least important group.

Per sequence, KMeans (k=3) groups the layers by the cosine similarity of their hidden state before and after
attention. The group with the highest similarity (attention changed the least) gets ``p`` x the mean budget; the
tokens it frees go to the other layers. No layer gets more than it holds; what that cap frees flows back to the
others, so the total stays exact. Fewer than 3 distinct similarities: uniform.
"""

from dataclasses import dataclass

import numpy as np
import torch

import squeezekit
from squeezekit.budget import distribute


@dataclass
class Squeeze(squeezekit.LayerBudgetAllocator):
    """SqueezeAttention: KMeans(3) on layer importance; the least important group gets p x the mean budget."""

    name = "squeeze"
    p: float = 0.4
    n_init: int = 10
    random_state: int = 0

    def __post_init__(self):
        squeezekit.check("p", self.p, 0 < self.p <= 1, "must be in (0, 1]")
        squeezekit.check("n_init", self.n_init, self.n_init >= 1, "must be an integer >= 1")

    def groups(self, importance: np.ndarray) -> np.ndarray | None:
        """Boolean mask of the least important group of one sequence's layers, or None if degenerate."""
        from sklearn.cluster import KMeans

        if np.unique(importance).size < 3:
            return None
        km = KMeans(n_clusters=3, n_init=self.n_init, random_state=self.random_state)
        labels = km.fit_predict(importance.reshape(-1, 1))
        return labels == int(np.argmax(km.cluster_centers_.ravel()))

    def allocate(self, request):
        importance = request.importance.detach().double().cpu().numpy()
        n_layers = importance.shape[1]
        targets = []
        for row, total in zip(importance, request.total.tolist()):
            mean = total / n_layers
            squeezed = self.groups(row)
            target = np.full(n_layers, mean)
            if squeezed is not None:
                target[squeezed] = self.p * mean
                target[~squeezed] = (total - squeezed.sum() * self.p * mean) / (~squeezed).sum()
            targets.append(target)
        return distribute(torch.as_tensor(np.stack(targets)), request.total, request.floor, request.cap)


@squeezekit.hookimpl
def register_allocators(register):
    register(Squeeze)
