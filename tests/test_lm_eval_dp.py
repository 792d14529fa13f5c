"""``accelerate launch -m lm_eval --model squeezekit`` runs data-parallel and scores exactly as one process does.

Needs 2 CUDA devices, lm-eval and accelerate (skipped otherwise: lm-eval's `HFLM` only splits the documents over
processes when it sees more than one GPU). Both runs use the unmodified lm-eval command line on a random tiny Llama
and local tasks of all three request types, with a compressed cache (squeeze allocation, h2o eviction, budget 0.3),
batch size 1 so that every document sees the same kernels in either run. Every document's response (generated
text, log-likelihoods) and every aggregate score must be equal. Set ``SQUEEZEKIT_REPORT_DIR`` to keep
both runs' result files and a Markdown comparison (docs/benchmarks/lm-eval-dp-2gpu.md was written that way).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from squeezekit.evaluators.testing import make_tiny_model, write_tiny_tasks  # noqa: E402

TASKS = "tiny_gen,tiny_mc,tiny_ppl"
MODEL_ARGS = "allocator=squeeze,evictor=h2o,budget=0.3"
N_DOCS = 15  # odd: the two ranks get different numbers of documents, and lm-eval pads the shorter one


def _run(launcher: list[str], args: list[str], out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*launcher, "-m", "lm_eval", *args, "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 1, files
    samples = {}  # (task, doc_id) -> the model's filtered responses: generated text or per-choice loglikelihoods
    for file in out.rglob("samples_*.jsonl"):
        task = file.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in file.read_text().splitlines():
            row = json.loads(line)
            samples[(task, row["doc_id"])] = row["filtered_resps"]
    result = json.loads(files[0].read_text())
    return result | {"_file": str(files[0]), "_samples": samples, "_stderr": done.stderr}


def _scores(results: dict) -> dict[tuple[str, str], float]:
    return {
        (task, metric): float(value)
        for task, metrics in results["results"].items()
        for metric, value in metrics.items()
        if "," in metric and "_stderr" not in metric and isinstance(value, (int, float))
    }


def test_data_parallel_scores_equal_one_process(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    tasks = write_tiny_tasks(tmp_path / "tasks", n=N_DOCS)
    args = [
        "--model", "squeezekit", "--model_args", f"pretrained={model},{MODEL_ARGS}",
        "--tasks", TASKS, "--include_path", str(tasks), "--batch_size", "1",
    ]  # fmt: skip
    one = _run([sys.executable], [*args, "--device", "cuda:0"], tmp_path / "one")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = _run(launch, args, tmp_path / "two")

    assert two["config"]["model"] == one["config"]["model"] == "squeezekit"
    assert "on rank 1" in two["_stderr"] and "on rank 1" not in one["_stderr"]  # lm-eval built rank 1's share
    assert len(one["_samples"]) == 3 * N_DOCS and one["_samples"] == two["_samples"]  # every document's output
    for task in TASKS.split(","):
        assert one["n-samples"][task]["effective"] == two["n-samples"][task]["effective"] == N_DOCS
    a, b = _scores(one), _scores(two)
    assert set(a) == set(b) and {t for t, _ in a} == set(TASKS.split(","))
    _report(a, b, one["_file"], two["_file"])
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=1e-9, abs_tol=0.0), (key, a[key], b[key])


def _report(one: dict, two: dict, *files: str) -> None:
    rows = [f"| {t} | {m.split(',')[0]} | {one[(t, m)]:.10g} | {two[(t, m)]:.10g} |" for t, m in sorted(one)]
    head = ["| task | metric | 1 process (cuda:0) | 2 processes (accelerate launch) |", "|---|---|---|---|"]
    table = "\n".join([*head, *rows])
    print("\n" + table)
    target = os.environ.get("SQUEEZEKIT_REPORT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / "lm-eval-dp-table.md").write_text(table + "\n")
        for name, file in zip(("one-process", "two-processes"), files, strict=True):
            shutil.copy(file, Path(target) / f"lm-eval-dp-{name}.json")
