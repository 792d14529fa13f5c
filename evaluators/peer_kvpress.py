"""The kvpress peer of ``squeezekit bench``, run as a script in its own process (``bench --peer-kvpress SITE``).

NVIDIA kvpress needs transformers < 5.3, so it cannot share squeezekit's process: the bench starts this script with
``SITE`` (a folder holding kvpress and the transformers it needs, e.g. ``pip install --target SITE kvpress==0.5.5
transformers==5.2.0``) first on ``PYTHONPATH``. The script builds the same random-weight model from the same config
and times ``model.generate`` inside kvpress's ``StreamingLLMPress`` context, with the bench's own `build_model` and
`run_hf` (bench_models.py, which imports neither squeezekit's data path nor its transformers surface). One JSON line
per batch size on stdout. Installed with the package, unlike the checkout's benchmarks/ scripts: the bench runs it as
``python -m squeezekit.evaluators.peer_kvpress`` wherever squeezekit is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json

import torch
from squeezekit.evaluators import bench_models as bench


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="a named config of bench_models.py (CONFIGS)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="48,64,96")
    p.add_argument("--budget", type=float, default=0.2, help="fraction of the prompt's KV kept (1 - compression ratio)")
    args = p.parse_args()

    import transformers as tf
    from kvpress import StreamingLLMPress

    model = bench.build_model(args.config, args.device, getattr(torch, args.dtype))  # the same model as the bench's
    vocab = model.config.vocab_size
    press = StreamingLLMPress(compression_ratio=round(1 - args.budget, 6))
    name = f"kvpress StreamingLLMPress({press.compression_ratio})"
    versions = {"kvpress": importlib.metadata.version("kvpress"), "transformers": tf.__version__}
    g = torch.Generator().manual_seed(1)
    # that the press really compresses: the cache length after one prefill (transformers' own would be prompt_len)
    probe = torch.randint(1, vocab, (1, args.prompt_len), generator=g).to(args.device)
    with torch.inference_mode(), press(model):
        # (this process runs the transformers kvpress needs, which still names the output `past_key_values`)
        kept_tokens = model(probe, use_cache=True).past_key_values.get_seq_length()
    del probe
    for B in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(1, vocab, (B, args.prompt_len), generator=g).to(args.device)
        try:
            with press(model):
                r = bench.run_hf(model, ids, args.new_tokens, args.device)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not bench.is_oom(exc):
                raise
            r = None
        del ids
        if r is None:  # outside the except block, so the traceback's tensors can be freed
            bench.peak_reset(args.device)
            print(json.dumps({"method": name, "B": B, "oom": True, **versions}), flush=True)
            break
        r.pop("tokens")
        r["kv_bytes"] = B * kept_tokens * bench.kv_bytes_per_token(model)  # after prefill
        r["kv_tokens_after_prefill"] = kept_tokens
        r["kv_bytes_peak_prefill"] = None  # compressed layer by layer inside the forward: not counted
        print(json.dumps({**r, "method": name, "B": B, **versions}), flush=True)


if __name__ == "__main__":
    main()
