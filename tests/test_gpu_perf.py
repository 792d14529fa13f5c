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
