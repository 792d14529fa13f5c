"""The GPU timing script (benchmarks/lm_eval_timing.py) runs end to end on the CPU with tiny settings, and
``squeezekit eval`` records the device and dtype of its results and never mixes two in one store."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmark_scripts import load  # noqa: E402
from squeezekit.evaluators import sweep  # noqa: E402
from squeezekit.evaluators.testing import make_tiny_model, standin_text  # noqa: E402

from squeezekit.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
lm_eval_timing = load("lm_eval_timing")


def test_timing_script_runs_on_cpu(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(standin_text(4000, seed=2))
    out = tmp_path / "out"
    args = ["--out", str(out), "--device", "cpu", "--models", "tiny", "--limit", "2", "--ppl-limit", "2",
            "--lengths", "512", "--batch-size", "2", "--check", "2", "--warmup", "1", "--text-file", str(text),
            "--fast", "true"]  # fmt: skip
    assert lm_eval_timing.main(args) == 0
    data = json.loads((out / "lm-eval-timing.json").read_text())
    runs = {(r["method"], r["task"], r["length"]): r for r in data["runs"]}
    assert set(runs) == {(m, t, 512) for m in lm_eval_timing.METHODS for t in ("niah_single_1", "squeezekit_ppl")}
    assert all(r["seconds"] > 0 and r["n"] == 2 for r in runs.values())
    assert 0.15 < runs[("squeezekit@compressed", "niah_single_1", 512)]["kv_fraction"] < 0.25
    for method in lm_eval_timing.METHODS[1:]:  # squeezekit generated through the serving path, as it will on CUDA
        assert runs[(method, "niah_single_1", 512)]["generate_batches"] == {"serving": 1, "generate": 0}
    (meta,) = data["meta"]["invocations"]
    assert meta["model"] == "tiny" and meta["units"] == ["niah_single_1@512:2", "squeezekit_ppl@512:2"]
    assert meta["environment"]["device"] == "cpu" and meta["environment"]["dtype"] == "float32"
    assert "--models tiny" in meta["command"]
    checks = {(c["task"], c["what"]): c for c in data["checks"]}
    for task in ("niah_single_1", "squeezekit_ppl"):
        assert checks[(task, "hf vs squeezekit@1.0")]["agree"] == 1.0  # fp32: the same tokens and scores
    assert checks[("niah_single_1", "compressed, serving path vs model.generate")]["agree"] == 1.0
    assert checks[("squeezekit_ppl", "compressed, scoring")]["agree"] == 1.0
    report = (out / "lm-eval-timing.md").read_text()
    assert "| niah_single_1 | 512 | 2 |" in report and "| squeezekit_ppl | 512 | 2 |" in report
    assert report.count("met**") == 2  # both targets stated, met or not, from the measured numbers
    assert "squeezekit@1.0 <= 1.1x hf on all units" in report and "<= 0.6x hf on the 512-token units" in report
    # a second invocation for one task replaces that unit's rows only
    assert lm_eval_timing.main([*args[:-2], "--tasks", "squeezekit_ppl", "--check", "0", "--warmup", "0"]) == 0
    again = json.loads((out / "lm-eval-timing.json").read_text())
    assert len(again["runs"]) == 6 and [inv["units"] for inv in again["meta"]["invocations"]] == [
        ["niah_single_1@512:2"], ["squeezekit_ppl@512:2"]]  # fmt: skip
    assert {c["task"] for c in again["checks"] if c["what"].startswith("compressed")} == {"niah_single_1"}


def test_targets_from_numbers():
    rows = [("hf", 10.0, 20.0), ("squeezekit@1.0", 10.5, 23.0), ("squeezekit@compressed", 9.0, 11.0)]
    data = {"runs": [{"model": "m", "method": m, "task": "t", "length": L, "seconds": s}
                     for m, a, b in rows for L, s in ((4096, a), (8192, b))]}  # fmt: skip
    full, compressed = lm_eval_timing.targets(data, "m")
    assert full["ratio"] == pytest.approx(33.5 / 30) and not full["met"]
    assert (
        compressed["scope"] == "the 8192-token units"
        and compressed["ratio"] == pytest.approx(0.55)
        and compressed["met"]
    )
    assert compressed["per_unit"] == {"t@8192": pytest.approx(0.55)}


class FakeEvaluator:
    def __init__(self, model_dir, *args, **kwargs):
        self.model_dir, self.lm = "tiny", SimpleNamespace(extend_chunk=16, rolling_prompt=0.5)
        FakeEvaluator.kwargs = kwargs

    def run(self, config, unit, **kwargs):
        return {"metric": "accuracy", "value": 1.0, "stderr": 0.0, "n": 1, "scores": [1.0], "seconds": 0.0,
                "kv_fraction": None}  # fmt: skip


def test_sweep_records_device_and_dtype_and_never_mixes_them(tmp_path, monkeypatch):
    from squeezekit.evaluators import evaluator, reports, suite

    from squeezekit.config import Config

    monkeypatch.setattr(evaluator, "Evaluator", FakeEvaluator)
    monkeypatch.setattr(reports, "write_reports", lambda data, out: None)
    text = tmp_path / "text.txt"
    text.write_text(standin_text(200))
    model = make_tiny_model(tmp_path / "tiny", layers=2)
    units = suite.parse_suite("squeezekit_passkey@256:1")
    full = [Config.from_mapping({"budget": 1.0})]
    half = [Config.from_mapping({"budget": 0.5})]
    out = tmp_path / "results"
    data = sweep.run_sweep(full, units, out, model, text_file=str(text), progress=False, device="cpu", dtype="float32")
    assert (data["meta"]["device"], data["meta"]["dtype"]) == ("cpu", "float32")
    assert FakeEvaluator.kwargs == {"device": "cpu", "dtype": "float32"}  # what the lm-eval model is built with
    sweep.run_sweep(half, units, out, model, text_file=str(text), progress=False, device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match="holds results of another setting: dtype 'float32' .now 'float16'."):
        sweep.run_sweep(half, units, out, model, text_file=str(text), progress=False, device="cpu", dtype="float16")


def test_eval_cli_takes_device_and_dtype(monkeypatch, tmp_path):
    from squeezekit.cli import main

    seen = {}

    def fake_run_sweep(configs, units, out, *args, **kwargs):
        seen.update(kwargs)
        return {"meta": {}, "cells": {}}

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    assert main(["eval", "--device", "cpu", "--dtype", "float16", "--out", str(tmp_path), "--suite",
                 "squeezekit_ppl@256:1"]) == 0  # fmt: skip
    assert seen["device"] == "cpu" and seen["dtype"] == "float16"


def test_random_7b_is_built_with_smollm2s_tokenizer(monkeypatch):
    """The random-weight model: the named shapes (shrunk here), SmolLM2's vocabulary and special ids, built by the
    bench's `build_model`; lm-eval's HFLM and squeezekit take it as a model object. The bench's own models (the same
    function's defaults) have no end token: fixed-length generations."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from squeezekit.evaluators import bench_models as bench
    from squeezekit.evaluators.lm_eval_adapter import SqueezekitLM

    from squeezekit.models import default_model_dir

    small = dict(bench.CONFIGS["mistral-7b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    monkeypatch.setitem(bench.CONFIGS, "mistral-7b", small)
    tok_dir = str(default_model_dir())
    model = lm_eval_timing.evaluated_model("mistral-7b", tok_dir, "cpu", torch.float32)
    assert model.config.vocab_size == 49152 and model.config.model_type == "mistral"
    assert model.generation_config.eos_token_id == 2 and model.config.num_hidden_layers == 2
    benched = bench.build_model("mistral-7b", "cpu", torch.float32, layers=1)
    assert benched.config.vocab_size == 32000 and benched.config.num_hidden_layers == 1
    assert benched.generation_config.eos_token_id is None
    assert HFLM(pretrained=model, tokenizer=tok_dir, batch_size=2).max_length == 32768
    lm = SqueezekitLM(pretrained=model, tokenizer=tok_dir, batch_size=2, budget=0.5, evictor="h2o", fast=True)
    ctx, mask = lm.tok_batch_encode([standin_text(40, seed=1), standin_text(25, seed=2)])
    assert lm._model_generate(ctx, ctx.shape[1] + 3, ["\n"], attention_mask=mask, do_sample=False).shape == (
        2,
        ctx.shape[1] + 3,
    )
