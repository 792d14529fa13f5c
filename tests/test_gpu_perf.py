"""evaluators/gpu_perf.py runs end to end at toy sizes on the CPU (the GPU run uses the same code at full size)."""

from __future__ import annotations

import json


def test_gpu_perf_quick_runs_on_cpu(tmp_path):
    from squeezekit.evaluators import gpu_perf

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
