"""``squeezekit bench`` on the CPU with the tiny config: its defaults fit the model and the device, the report is
printed (and written only where ``--out`` says), every figure in it is a real measurement, and every option's help
says its default. What the figures are on a GPU is measured by the bench itself (docs/benchmarks), not asserted."""

from __future__ import annotations

import json
import math
import re

import pytest

from squeezekit.cli import build_parser, main

#: a few seconds: short prompts, few tokens, no correctness checks (tests/test_fast_path.py runs those)
QUICK = ["bench", "--device", "cpu", "--model", "tiny", "--prompt-len", "32", "--new-tokens", "4", "--check-batch", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


def bench_args(*argv: str):
    """The parsed and checked arguments of ``squeezekit bench ARGV`` (nothing is built or run)."""
    from squeezekit.evaluators.bench_cli import check_args

    args = build_parser(["bench", *argv]).parse_args(["bench", *argv])
    methods, batches = check_args(args)
    return args, batches


def table_rows(markdown: str) -> list[dict[str, str]]:
    """The rows of the report's (first) table, by column name."""
    text = markdown.splitlines()
    first = next(i for i, line in enumerate(text) if line.startswith("| "))
    lines = []
    for line in text[first:]:
        if not line.startswith("|"):
            break
        if line.startswith("| "):
            lines.append(line)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]]


def test_the_defaults_fit_the_model_and_the_device(tmp_path):
    args, batches = bench_args("--device", "cpu", "--model", "tiny")
    assert args.prompt_len == 4096 - 128  # tiny has 4096 positions: the prompt leaves room for the new tokens
    assert batches == [1, 2, 4, 8]  # auto on the CPU: a short ladder
    assert args.max_seconds_per_run == 20 and args.out is None and args.threads == 1  # tiny: one thread
    assert bench_args("--device", "cpu", "--model", "tiny", "--new-tokens", "1000")[0].prompt_len == 3096
    # the correctness checks generate after the same prompts: the longer of the two leaves the room
    checks = ("--device", "cpu", "--model", "tiny", "--new-tokens", "4", "--check-tokens", "200")
    assert bench_args(*checks)[0].prompt_len == 3896
    assert bench_args(*checks, "--check-batch", "0")[0].prompt_len == 4092  # no checks: only the new tokens
    args = bench_args("--device", "cpu", "--model", "mistral-7b")[0]
    assert args.prompt_len == 4096 and args.threads is None  # 32768 positions; torch's own threads
    short = tmp_path / "short"
    short.mkdir()  # a local model's maximum is read from its config.json (or its text_config)
    (short / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 300}}))
    assert bench_args("--device", "cpu", "--model", str(short), "--new-tokens", "44")[0].prompt_len == 256
    args, batches = bench_args("--device", "cpu", "--model", "tiny", "--batches", "3,1", "--max-seconds-per-run", "0")
    assert batches == [3, 1] and args.max_seconds_per_run == 0


def test_every_option_says_its_default():
    """The help formatter adds ``(default: X)`` except for None, False and 0: those options say it themselves."""
    parser = build_parser(["bench"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["bench"]
    formatter = sub._get_formatter()
    helps = {a.option_strings[-1]: formatter._expand_help(a) for a in sub._actions if a.dest != "help"}
    assert {"--out", "--prompt-len", "--max-seconds-per-run", "--threads", "--no-cuda-graph"} <= set(helps)
    for option, text in helps.items():
        assert "default" in text, (option, text)
        assert " ".join(text.split()) in " ".join(sub.format_help().split())  # as --help shows it


def test_bench_prints_its_table_and_writes_nothing_without_out(tmp_path, monkeypatch, capsys):
    """Without --out: the table on stdout, no file anywhere; every method runs, each ladder stopped by the time
    budget after its first batch size (a budget nothing meets)."""
    monkeypatch.chdir(tmp_path)
    argv = ["--batches", "1,2,4", "--methods", "hf,squeeze+streaming@0.5", "--max-seconds-per-run", "0.001"]
    assert main([*QUICK, *argv]) == 0
    out, err = capsys.readouterr()
    assert list(tmp_path.iterdir()) == []
    # progress off a terminal: plain lines on stderr, from the first run to the last
    assert "squeezekit: bench 0/6 runs (0%)" in err and re.search(r"^squeezekit: bench 6/6 runs \(100%\)", err, re.M)
    assert [(r["method"], r["B"]) for r in table_rows(out)] == [("hf", "1"), ("squeeze+streaming@0.5", "1")]
    for method in ("hf", "squeeze+streaming@0.5"):
        assert re.search(rf"^- {re.escape(method)}: batch 2, 4 not run: batch 1 took \d+\.\d s, longer than "
                         r"--max-seconds-per-run 0\.001$", out, flags=re.M), out  # fmt: skip
    assert "nan" not in out.lower()


def test_bench_writes_its_reports_with_out(tmp_path, capsys):
    out = tmp_path / "reports"
    assert main([*QUICK, "--batches", "1,2", "--methods", "hf,squeeze+streaming@0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["bench-tiny.json", "bench-tiny.md", "bench-tiny.png"]
    markdown = (out / "bench-tiny.md").read_text()
    assert printed == markdown and "nan" not in markdown.lower() and "n/a" in markdown  # CPU: no peak memory
    results = json.loads((out / "bench-tiny.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert [(r["method"], r["B"]) for r in results["runs"]] == [(m, b) for m in ("hf", "squeeze+streaming@0.5")
                                                                for b in (1, 2)]  # fmt: skip
    assert results["copy_bandwidth_Bps"] > 1e8
    for r in results["runs"]:
        for key in ("decode_tok_s", "step_ms", "e2e_tok_s", "floor_step_ms", "total_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert 0 <= r["prefill_s"] < r["total_s"], r
        assert r["floor_step_ms"] < r["step_ms"]  # no step beats reading the weights and the KV once
        # decode time and prefill time are parts of the one run: tokens/s and step ms say the same
        assert r["decode_tok_s"] == pytest.approx(r["B"] * 1000 / r["step_ms"], rel=0.02)
    for row in table_rows(markdown):
        assert float(row["decode tok/s"]) > 0 and float(row["step ms"]) > 0 and row["peak GiB"] == "n/a"
    assert (out / "bench-tiny.png").stat().st_size > 1000


def test_the_readme_command_is_a_valid_bench_command():
    """The CPU command README.md shows (and says how long it took): its arguments pass, and it writes nothing."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = shlex.split(re.search(r"```bash\n(squeezekit bench [^\n]*)\n```", readme).group(1))
    args, batches = bench_args(*command[2:])
    assert args.device == "cpu" and args.model == "tiny" and args.out is None
    assert args.prompt_len == 3968 and batches == [1, 2, 4, 8] and args.threads == 1


def test_transformers_quantized_cache_is_a_baseline_and_a_missing_backend_says_why(tmp_path):
    """``hf@fp8`` times transformers' own QuantizedCache (its fp8 backend needs no package) and counts the bytes its
    layers hold; a backend whose package is not installed is a note saying why, not a crash; 8-bit squeezekit
    slots are counted in the KV column too."""
    import importlib.util

    import transformers

    out = tmp_path / "reports"
    methods = "hf,hf@fp8,hf@hqq4,squeeze+streaming@0.5,squeeze+streaming@0.5/kv_bits=8"
    assert main([*QUICK, "--batches", "2", "--methods", methods, "--out", str(out)]) == 0
    results = json.loads((out / "bench-tiny.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    notes = " ".join(results["notes"])
    has_fp8 = hasattr(transformers.cache_utils, "Fp8QuantizedLayer")
    if has_fp8:
        assert runs["hf@fp8"]["kv_bytes"] == pytest.approx(runs["hf"]["kv_bytes"] / 4, rel=0.1)  # fp32 model
    else:
        assert "hf@fp8 not run: " in notes
    if importlib.util.find_spec("hqq") is None:
        assert "hf@hqq4" not in runs and "hf@hqq4 not run: ImportError" in notes
    assert runs["squeeze+streaming@0.5/kv_bits=8"]["kv_bytes"] < 0.3 * runs["squeeze+streaming@0.5"]["kv_bytes"]


@pytest.mark.parametrize("method", ["hf@zzz", "hf@quanto3", "hf@fp84"])
def test_an_unknown_quantized_backend_is_a_one_line_error(method, capsys):
    assert main([*QUICK, "--methods", method]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "expected a QuantizedCache backend: hf@fp8, hf@quanto2" in err


def test_transformers_serving_paths_are_baselines_with_the_same_tokens(tmp_path):
    """``hf-static`` (a StaticCache, warmed up on the same cache first) and ``hf-cb`` (continuous batching through
    ``generate_batch``, timed from its per-token timestamps) run at their own batch sizes, report what they hold,
    and give transformers' greedy tokens (the correctness checks)."""
    out = tmp_path / "reports"
    argv = [*QUICK[:-1], "2", "--check-tokens", "4", "--batches", "1,3", "--methods", "hf,hf-static,hf-cb:2"]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads((out / "bench-tiny.json").read_text())
    runs = {(r["method"], r["B"]): r for r in results["runs"]}
    assert set(runs) == {("hf", 1), ("hf", 3), ("hf-static", 1), ("hf-static", 3), ("hf-cb", 2)}
    for r in runs.values():
        assert r["decode_tok_s"] > 0 and r["e2e_tok_s"] > 0 and r["step_ms"] > 0 and r["prefill_s"] > 0
    per_token = runs["hf", 3]["kv_bytes"] / (3 * 32)
    assert runs["hf-static", 3]["kv_bytes"] == 3 * (32 + 4) * per_token  # every slot, from the start
    assert runs["hf-static", 3]["warmup_s"] > 0
    assert runs["hf-cb", 2]["kv_bytes"] == 2 * 256 * per_token  # a 256-token page per request
    assert runs["hf-cb", 2]["setup_s"] >= 0
    checks = {c["method"]: c for c in results["checks"]}
    assert checks["hf-static"]["token_agreement"] == 1.0 and checks["hf-cb"]["token_agreement"] == 1.0


def test_the_decoding_time_of_continuous_batching_counts_overlaps_once():
    from squeezekit.evaluators.bench_serving import busy_time

    assert busy_time([]) == 0
    assert busy_time([(0.0, 2.0), (1.0, 3.0)]) == 3.0  # overlapping
    assert busy_time([(0.0, 4.0), (1.0, 2.0)]) == 4.0  # nested
    assert busy_time([(5.0, 6.0), (0.0, 1.0), (0.5, 1.5)]) == 2.5  # disjoint, unsorted


def test_continuous_batching_runs_outside_inference_mode_also_from_inside_it(monkeypatch):
    """transformers 5.17's manager builds its batch processor's tensors in the calling thread (its warm-up) and its
    generation thread updates them in place: under inference mode (the bench's correctness checks) every request
    failed. `run_batching` calls ``generate_batch`` outside inference mode wherever it is called from."""
    import types

    import torch
    from squeezekit.evaluators.bench_models import build_model
    from squeezekit.evaluators.bench_serving import run_batching

    model = build_model("tiny", "cpu", torch.float32)
    seen = []

    def generate_batch(inputs, generation_config, continuous_batching_config, record_timestamps, progress_bar):
        seen.append(torch.is_inference_mode_enabled())
        n = generation_config.max_new_tokens
        return {
            f"req_{i}": types.SimpleNamespace(error=None, generated_tokens=[1] * n, created_time=0.0,
                                              timestamps=[1.0 + 0.5 * t for t in range(n)])
            for i in range(len(inputs))
        }  # fmt: skip

    monkeypatch.setattr(model, "generate_batch", generate_batch)
    ids = torch.ones(2, 8, dtype=torch.long)
    with torch.inference_mode():
        r = run_batching(model, ids, 4, "cpu")
    assert seen == [False]
    assert r["decode_tok_s"] == 2 * 3 / 1.5 and r["prefill_s"] == 1.0 and r["step_ms"] == 500.0
