"""Tensor parallel on transformers' own engine (`squeezekit.parallel`), on 2 CPU processes with gloo: a tiny Llama
loaded with ``tp_plan="auto"`` under torchrun holds half its KV heads on each rank, and every config gives the tokens
and layer budgets of one process, through ``model.generate`` and through the serving path (micro-batched prefill and
the greedy decoder): view-based allocators (lost_attention, dynamickv) see every head through an all-gather, the
adaptive head split splits every head of a layer and each rank keeps its share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("transformers.distributed", reason="transformers without DistributedConfig (before 5.x)")
    root = tmp_path_factory.mktemp("tp")
    tiny_model("llama").save_pretrained(root / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    subprocess.run([sys.executable, str(WORKER), str(root / "model"), str(root), "--single"], check=True, env=env,
                   timeout=300)  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    done = subprocess.run([*launch, str(WORKER), str(root / "model"), str(root)], env=env, timeout=600,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: json.loads((root / f"{name}.json").read_text()) for name in ("single", "rank0", "rank1")}


def test_every_rank_gives_one_process_tokens_and_budgets(runs):
    from tp_worker import CONFIGS

    for i, config in enumerate(CONFIGS):
        one = runs["single"][i]
        assert one["generate"] == one["served"], config  # (the serving path on one process, for reference)
        for rank in ("rank0", "rank1"):
            got = runs[rank][i]
            assert got["generate"] == one["generate"] and got["served"] == one["generate"], (config, rank)
            assert got["budgets"] == one["budgets"], (config, rank)


def test_each_rank_holds_its_own_kv_heads_within_budget(runs):
    for i in range(len(runs["single"])):
        one, r0 = runs["single"][i], runs["rank0"][i]
        assert r0["kv_heads"] * 2 == one["kv_heads"]
        budgets = r0["budgets"][0]
        if budgets[0] >= 0:
            assert all(h <= max(budgets) + 8 for h in r0["held"])
