"""CI smoke test: the literal ``lm_eval --model squeezekit ...`` command, in a subprocess, with lm-eval unmodified.

It works only if the installed package registered the model: through the startup hook for lm-eval 0.4.13 (see
squeezekit/evaluators/_lm_eval_hook.py) or the ``lm_eval.models`` entry point for later releases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from squeezekit.evaluators.testing import make_tiny_model, write_tiny_tasks  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    tasks = write_tiny_tasks(tmp_path_factory.mktemp("tiny-tasks"))
    return model, tasks


def _lm_eval(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lm_eval") or shutil.which("lm-eval")
    cmd = [exe] if exe else [sys.executable, "-m", "lm_eval"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600)


def test_literal_lm_eval_command(setup):
    model, tasks = setup
    out = _lm_eval(
        "--model", "squeezekit",
        "--model_args", f"pretrained={model},allocator=squeeze,evictor=streaming,budget=0.5",
        "--tasks", "tiny_gen,tiny_mc,tiny_ppl",
        "--include_path", str(tasks),
        "--limit", "2", "--device", "cpu", "--batch_size", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert text.lstrip().startswith("squeezekit (") and "'evictor': 'streaming'" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("|")}
    assert {"tiny_gen", "tiny_mc", "tiny_ppl"} <= set(rows)
    assert "exact_match" in rows["tiny_gen"] and "acc" in rows["tiny_mc"] and "bits_per_byte" in rows["tiny_ppl"]


@pytest.mark.slow  # a second lm-eval start-up (~15 s); the error itself is covered in-process too
def test_unknown_model_arg_is_a_config_error(setup):
    model, tasks = setup
    out = _lm_eval(
        "--model", "squeezekit", "--model_args", f"pretrained={model},evictor=streaming,budgte=0.2",
        "--tasks", "tiny_gen", "--include_path", str(tasks), "--limit", "1", "--device", "cpu",
    )  # fmt: skip
    assert out.returncode != 0
    assert "config error: model_args: budgte = 0.2: unknown key" in out.stderr and "did you mean 'budget'?" in out.stderr
