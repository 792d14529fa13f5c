"""The lm-eval adapter's scoring as it was before the serving path, kept as the reference that the equality checks
compare the adapter with: tests/test_lm_eval_fast_path.py on the CPU, and ``lm_eval_timing.py --check`` (beside it) on
the GPU. Not installed: support of those two, imported from this folder. (Generation needs no copy: ``fast=false``
still runs ``model.generate``.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from squeezekit.evaluators.lm_eval_adapter import SqueezekitLM

from squeezekit.transformers_api import cache_argument, output_cache


class PreviousScoringLM(SqueezekitLM):
    """`SqueezekitLM` scoring as it was before the serving path (commit 2dcf68c), verbatim."""

    def _score_batch(self, rows: list[dict]) -> None:
        device = self.device
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        B = len(rows)
        for row in rows:
            row["shared_ll"], row["shared_greedy"], row["last"] = 0.0, True, None
        if any(row["P"] < 2 for row in rows):
            for row in rows:
                with torch.no_grad():
                    logits = self.model(torch.tensor([row["inp"]], device=device)).logits[0]
                self._take(row, 0, F.log_softmax(logits.float(), dim=-1))
            return
        maxP = max(row["P"] for row in rows)
        ids = torch.full((B, maxP), pad, dtype=torch.long)
        mask = torch.zeros(B, maxP, dtype=torch.long)
        for b, row in enumerate(rows):
            P = row["P"]
            ids[b, maxP - P :] = torch.tensor(row["inp"][:P])
            mask[b, maxP - P :] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        keep = max(row["P"] - row["s"] for row in rows)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        with torch.no_grad(), self._compress() as compressor:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep)
            self._record(compressor)
            cache = output_cache(out)
            for b, row in enumerate(rows):
                first = row["s"]
                cols = out.logits[b, keep - (row["P"] - first) :]
                self._take(row, first, F.log_softmax(cols.float(), dim=-1))
            del out
            rest = max(len(row["inp"]) - row["P"] for row in rows)
            C = self.extend_chunk
            for k in range(0, rest, C):
                w = min(C, rest - k)
                new = torch.full((B, w), pad, dtype=torch.long)
                new_mask = torch.zeros(B, w, dtype=torch.long)
                new_pos = torch.zeros(B, w, dtype=torch.long)
                for b, row in enumerate(rows):
                    start = row["P"] + k
                    toks = row["inp"][start : start + w]
                    if toks:
                        new[b, : len(toks)] = torch.tensor(toks)
                        new_mask[b, : len(toks)] = 1
                    new_pos[b] = torch.arange(start, start + w).clamp_max(len(row["inp"]) - 1)
                mask = torch.cat([mask, new_mask.to(device)], dim=1)
                out = self.model(
                    input_ids=new.to(device),
                    attention_mask=mask,
                    position_ids=new_pos.to(device),
                    use_cache=True,
                    **{cache_argument(self.model): cache},
                )
                for b, row in enumerate(rows):
                    start = row["P"] + k
                    m = int(new_mask[b].sum())
                    if m:
                        self._take(row, start, F.log_softmax(out.logits[b, :m].float(), dim=-1))
                cache = output_cache(out)
                del out

    @staticmethod
    def _take(row: dict, first: int, logprobs: torch.Tensor) -> None:
        n = len(row["inp"])
        lo = max(first, row["s"])
        hi = min(first + logprobs.shape[0], n)
        if hi <= lo:
            return
        lp = logprobs[lo - first : hi - first]
        shared_hi = min(hi, n - 1)
        if shared_hi > lo:
            targets = torch.tensor(row["targets"][lo:shared_hi], device=lp.device)
            part = lp[: shared_hi - lo]
            row["shared_ll"] += float(part.gather(1, targets[:, None]).sum())
            row["shared_greedy"] = row["shared_greedy"] and bool((part.argmax(-1) == targets).all())
        if hi == n:
            row["last"] = lp[-1].cpu()
