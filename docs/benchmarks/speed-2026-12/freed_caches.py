"""CUDA memory held after each of three served generations in a row (is a dropped cache freed at once?).

    python docs/benchmarks/speed-2026-12/freed_caches.py [--batch 64] [--prompt-len 4096]

Mistral-7B shapes with random bf16 weights (`squeezekit bench`'s model), lost_attention+streaming@0.2, micro-batched
prefill then 36 greedy steps through the CUDA-graph decoder, three times; after each prefill,
``torch.cuda.memory_allocated()`` and the KV bytes the cache holds. With every earlier cache freed, the allocated
memory stays flat; before 2d35c61 it grew by one cache per generation.
"""

import argparse

import torch
from squeezekit.evaluators import bench_models as bench

import squeezekit
from squeezekit.batching import prefill
from squeezekit.decoding import GreedyDecoder

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--prompt-len", type=int, default=4096)
args = parser.parse_args()
model = bench.build_model("mistral-7b", "cuda", torch.bfloat16)
g = torch.Generator().manual_seed(0)
ids = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt_len), generator=g).cuda()


def serve() -> None:
    config = dict(allocator="lost_attention", evictor="streaming", budget=0.2)
    with torch.inference_mode(), squeezekit.compress(model, **config) as c:
        cache, logits = prefill(model, c, ids, None, micro_batch=16)
        held, allocated = cache.kv_nbytes() / 2**30, torch.cuda.memory_allocated() / 2**30
        GreedyDecoder(model, cache, logits.argmax(-1)).run(36)
    print(f"after prefill: {allocated:.2f} GiB allocated, the cache's KV {held:.3f} GiB", flush=True)


for _ in range(3):
    serve()
