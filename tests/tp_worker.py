"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by tests/test_tensor_parallel.py: load MODEL_DIR tensor
parallel, generate with each config through model.generate and through the serving path, write this rank's tokens
and budgets to OUT/rank{r}.json. With no torchrun (``--single``), the same on one process (the reference)."""

from __future__ import annotations

import json
import sys

import torch

import squeezekit
from squeezekit.batching import prefill
from squeezekit.decoding import GreedyDecoder

CONFIGS = [
    {"budget": 1.0},
    {"allocator": "uniform", "evictor": "snapkv", "budget": 0.25},
    {"allocator": "squeeze", "evictor": "h2o", "budget": 0.25},
    {"allocator": "lost_attention", "evictor": "snapkv", "budget": 0.25},
    {"allocator": "dynamickv", "evictor": "criticalkv", "budget": 0.25},
    {"allocator": "cake", "evictor": "expected_attention", "budget": 0.25, "heads": "adaptive"},
]


def main(model_dir: str, out: str, single: bool) -> None:
    from transformers import AutoModelForCausalLM

    if single:
        model, rank = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), "single"
    else:
        from transformers.distributed import DistributedConfig

        tp = DistributedConfig(tp_size=2, tp_plan="auto")
        model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=tp, dtype=torch.float32)
        rank = f"rank{torch.distributed.get_rank()}"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 128, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    results = []
    for config in CONFIGS:
        with torch.no_grad(), squeezekit.compress(model, **config) as c:
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
            budgets = c.summary()["budgets"].tolist()
            heads = [int(layer.valid.sum(-1).max()) for layer in c.last_cache.layers]
        with torch.inference_mode(), squeezekit.compress(model, **config) as c:
            cache, logits = prefill(model, c, ids, mask, micro_batch=1)
            first = logits.argmax(-1)
            served = torch.cat([first[:, None], GreedyDecoder(model, cache, first).run(7)], dim=1)
        results.append({"generate": tokens[:, 48:].tolist(), "served": served.tolist(), "budgets": budgets,
                        "held": heads, "kv_heads": c.last_cache.layers[0].valid.shape[1]})  # fmt: skip
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--single" in sys.argv)
