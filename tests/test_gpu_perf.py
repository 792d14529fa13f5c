"""benchmarks/gpu_perf.py runs end to end at toy sizes on the CPU (the GPU run uses the same code at full size)."""

from __future__ import annotations

import json

from benchmark_scripts import load

gpu_perf = load("gpu_perf")


def test_gpu_perf_quick_runs_on_cpu(tmp_path):
    assert gpu_perf.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "gpu_perf.json").read_text())
    assert all(v["status"] == "done" for v in res["stages"].values()), res["stages"]
    assert set(res["stages"]) == set(gpu_perf.STAGES)
    assert res["checks"] and all(c["ok"] for c in res["checks"])
    names = " ".join(t["target"] for t in res["targets"])
    for part in ("h2o prefill vs streaming", "chunked", "decode step vs floor at B=4", "B=8 at budget 0.2 fits"):
        assert part in names
    assert {d["variant"] for d in res["decode"]} == {
        "plain",
        "steady",
        "steady+decode",
    }  # compiled: GPU (or --quick-compile)
    assert (tmp_path / "gpu_perf.md").read_text().startswith("# gpu_perf")
    peers = [t for t in res["targets"] if "tok/s at B=8 vs" in t["target"]]  # no --baseline: not judged
    assert len(peers) == 2 and all(t["met"] is None for t in peers)
    assert all(t["measured"].endswith("not compared: no --baseline given") for t in peers)
    # the Triton decode kernel is off for CPU tensors: said so, SDPA alone timed
    assert [a["triton"] for a in res["decode_attention"]] == ["off: cpu tensors take the plain path"] * 2
    assert all(v == "did not run" for d in res["decode"] for v in d["kernels"].values())


def test_the_peers_figures_come_from_the_baseline_file_and_say_so(tmp_path):
    """The large batch is compared with the best hf and kvpress rows of a bench JSON (--baseline), not with figures
    kept in the script; the output names the file, its setting and the rows."""
    import pytest

    runs = [{"method": "hf", "B": 32, "decode_tok_s": 300.0}, {"method": "hf", "B": 48, "decode_tok_s": 500.0},
            {"method": "hf", "B": 64, "oom": True},
            {"method": "squeeze+streaming@0.2", "B": 8, "decode_tok_s": 9e9}]  # fmt: skip
    base = tmp_path / "bench-tiny.json"
    base.write_text(json.dumps({"device": "cpu", "config": "tiny", "prompt_len": 64, "runs": runs}))
    out = tmp_path / "out"
    assert gpu_perf.main(["--quick", "--out", str(out), "--device", "cpu", "--stages", "big_batch",
                          "--baseline", str(base)]) == 0  # fmt: skip
    res = json.loads((out / "gpu_perf.json").read_text())
    assert res["baseline"]["transformers"] == {"method": "hf", "B": 48, "decode_tok_s": 500.0}
    (row,) = res["big_batch"]
    hf, kvpress = (t for t in res["targets"] if "tok/s at B=8 vs" in t["target"])
    assert hf["target"] == "decode tok/s at B=8 vs transformers' best" and hf["goal"] == ">= 15x"
    source = f"hf at B=48, from {base} (device cpu, config tiny, prompt_len 64)"
    assert f"vs 500 tok/s ({source}): {row['decode_tok_s_replay'] / 500:.1f}x" in hf["measured"]
    assert hf["measured"].endswith("(indicative: not the same run)")  # the same config and prompt length
    assert kvpress["measured"].endswith(f"not compared: no kvpress run in {base}") and kvpress["met"] is None
    assert f"Baseline of the peers' figures: {base} (device cpu" in (out / "gpu_perf.md").read_text()
    for text, error in (("{", "Expecting property name"), ('{"runs": 3}', "not a squeezekit bench JSON")):
        base.write_text(text)
        with pytest.raises(SystemExit, match=f"^--baseline {base}: {error}"):
            gpu_perf.main(["--quick", "--out", str(out), "--device", "cpu", "--baseline", str(base)])


def test_the_scripts_run_away_from_the_checkout(tmp_path):
    """On the GPU machine the scripts run from a copy of benchmarks/ in /tmp against an installed squeezekit: they
    import nothing from the checkout but their own folder (gpu_perf.py nothing at all)."""
    import shutil
    import subprocess
    import sys

    from benchmark_scripts import FOLDER

    alone, folder = tmp_path / "alone", tmp_path / "benchmarks"
    alone.mkdir()
    shutil.copy(FOLDER / "gpu_perf.py", alone)
    shutil.copytree(FOLDER, folder, ignore=shutil.ignore_patterns("__pycache__"))
    for script in (alone / "gpu_perf.py", folder / "lm_eval_timing.py"):
        done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"usage: python benchmarks/{script.name}" in done.stdout
    probe = "import lm_eval_reference; print(lm_eval_reference.PreviousScoringLM.__name__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "PreviousScoringLM", done.stderr


def test_a_decode_kernel_that_falls_back_is_reported_and_the_stage_goes_on(tmp_path, monkeypatch):
    """The opt-in Triton decode kernel returns None when it is off or failed (its caller then runs SDPA): the decode
    stage says so in its rows and goes on (it used to call ``.float()`` on the None and fail). Here the kernel is
    chosen for CPU tensors, as it is for CUDA ones, and fails on its first use, as an incompatible Triton would."""
    import pytest

    from squeezekit import kernels
    from squeezekit.kernels import decode

    real_use = kernels.use

    def use(name, tensor):  # the decode kernel serves CPU tensors too; the others as before
        if name != "decode":
            return real_use(name, tensor)
        return name in kernels.settings.enabled and name not in kernels.settings.failed

    def broken():
        raise RuntimeError("no kernel today")

    for module in (kernels, decode):
        monkeypatch.setattr(module, "use", use)
    monkeypatch.setattr(decode, "_kernels", broken)
    monkeypatch.setattr(kernels, "falls_back", lambda where: True)  # as on the GPU
    with pytest.warns(RuntimeWarning, match="fused 'decode' kernel failed"):
        code = gpu_perf.main(["--quick", "--out", str(tmp_path), "--device", "cpu", "--stages", "decode"])
    res = json.loads((tmp_path / "gpu_perf.json").read_text())
    assert code == 0 and res["stages"]["decode"]["status"] == "done", res["stages"]
    assert [a["triton"] for a in res["decode_attention"]] == ["fell back to SDPA: RuntimeError: no kernel today"] * 2
    rows = {(d["B"], d["variant"]): d for d in res["decode"]}
    assert set(rows) == {(B, v) for B in (4, 8) for v in ("plain", "steady", "steady+decode")}
    assert all(rows[B, "steady+decode"]["kernels"]["decode"] == "fell back: RuntimeError: no kernel today"
               for B in (4, 8))  # fmt: skip
    assert rows[4, "steady"]["kernels"] == {"steady": "did not run"} and rows[4, "plain"]["kernels"] == {}  # CPU
    report = (tmp_path / "gpu_perf.md").read_text()
    assert "| 4 | steady+decode (decode fell back; steady did not run) |" in report


def test_the_kv_bits_script_runs_on_cpu_and_counts_the_quantized_bytes(tmp_path):
    """benchmarks/kv_bits.py (the GPU run of quantized slots) at toy sizes: every method runs its ladder, the
    served tokens equal generate's, and 8-bit slots hold about half of what 16-bit ones do (fp32 model: a quarter)."""
    kv_bits = load("kv_bits")
    methods = "uniform+streaming@0.2,uniform+streaming@0.2/kv_bits=8,uniform+snapkv@0.2/kv_bits=4/heads=adaptive"
    argv = ["--out", str(tmp_path), "--device", "cpu", "--config", "tiny", "--prompt-len", "256", "--ladder", "2,4",
            "--steps", "2", "--micro-batch", "2", "--check-tokens", "4", "--methods", methods]  # fmt: skip
    assert kv_bits.main(argv) == 0
    res = json.loads((tmp_path / "kv_bits.json").read_text())
    assert all(v == 1.0 for v in res["checks"]["served_vs_generate"].values())
    runs = {(r["method"], r["B"]): r for r in res["runs"]}
    assert len(runs) == 6 and all("step_ms" in r for r in runs.values())
    full, q8 = runs[("uniform+streaming@0.2", 4)], runs[("uniform+streaming@0.2/kv_bits=8", 4)]
    assert 0.2 < q8["kv_bytes"] / full["kv_bytes"] < 0.3


def test_the_kv_bits_script_decodes_with_the_fastest_tiles_of_a_decode_tiles_run(tmp_path, monkeypatch):
    """`--tiles FILE` sets the decode kernel's tile of each quantized precision to the fastest one timed there."""
    from squeezekit.kernels import decode

    kv_bits = load("kv_bits")
    rows = [dict(bits=8, tile=[64, 4, 2, 0, 1], us=9.0), dict(bits=8, tile=[128, 4, 3, 1, 0], us=7.5),
            dict(bits=8, tile=[32, 8, 2, 0, 0], error="out of resources"),
            dict(bits=4, tile=[32, 4, 2, 1, 1], us=20.0)]  # fmt: skip
    (tmp_path / "tiles.json").write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(decode, "TILES", dict(decode.TILES))  # (restored after the test)
    argv = ["--out", str(tmp_path / "out"), "--device", "cpu", "--config", "tiny", "--prompt-len", "128",
            "--ladder", "2", "--steps", "2", "--micro-batch", "2", "--check-tokens", "2",
            "--methods", "uniform+streaming@0.2/kv_bits=8", "--tiles", str(tmp_path / "tiles.json")]  # fmt: skip
    assert kv_bits.main(argv) == 0
    assert decode.TILES[(8, True)] == (128, 4, 3, 1, 0) and decode.TILES[(4, True)] == (32, 4, 2, 1, 1)
    res = json.loads((tmp_path / "out" / "kv_bits.json").read_text())
    assert res["tiles"]["8"]["us"] == 7.5


def test_the_policy_share_script_runs_on_cpu_and_times_each_policy_piece(tmp_path):
    """benchmarks/policy_share.py (issue 24 part 4 on the GPU) at toy sizes: every kernel setting and method is
    timed, the three policy pieces and their share of the prefill are reported, and the importance micro-benchmark
    compares the two paths (on the CPU both are the plain one: no difference), as does the window one with
    lost_attention's allocation."""
    policy_share = load("policy_share")
    methods = "uniform+streaming@0.2,squeeze+h2o@0.3"
    argv = ["--out", str(tmp_path), "--device", "cpu", "--config", "tiny", "--batch", "4", "--prompt-len", "128",
            "--micro-batch", "2", "--repeats", "1", "--reps", "1", "--methods", methods, "--profile"]  # fmt: skip
    assert policy_share.main(argv) == 0
    res = json.loads((tmp_path / "policy_share.json").read_text())
    runs = {(r["kernels"], r["method"]) for r in res["runs"]}
    assert len(runs) == 4 and len(res["runs"]) == 4
    for r in res["runs"]:
        assert set(r["policy_s"]) == {"importance", "allocation", "eviction"} and r["prefill_s"] > 0
        assert 0 < r["policy_share"] < 1
        assert r["fused"] == []  # (no kernel runs on the CPU)
    micro = res["importance_micro"]
    assert micro["fused_ran"] is False and micro["max_abs_diff_importance"] == 0.0
    window = res["window_micro"]  # lost_attention's allocation, both rules (the plain path twice on the CPU)
    assert window["shape"][1:4] == [2, 2, 128] and all(window[r]["same_budgets"] for r in ("sqrt", "greedy"))
    assert all(window[r]["plain_ms"] > 0 and window[r]["fused_ran"] is False for r in ("sqrt", "greedy"))
    md = (tmp_path / "policy_share.md").read_text()
    assert "| policy % of prefill | fused kernels that ran |" in md
    assert "lost_attention's allocation (fused, `sqrt`) under torch.profiler" in md and "aten::" in md
