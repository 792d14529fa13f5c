"""The offline evaluation suite: task data built at run time, the LongBench code path on local jsonl, the sweep."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from squeezekit.evaluators import suite  # noqa: E402
from squeezekit.evaluators.evaluator import Evaluator  # noqa: E402
from squeezekit.evaluators.testing import standin_text  # noqa: E402

LONGBENCH_DOCS = [  # the fields of LongBench's samsum (as lm-eval's longbench tasks read them)
    {
        "context": "Dialogue: Anna: are you coming tonight? Ben: yes, at eight. Anna: bring the cake.\nSummary: "
        "Ben will come at eight and bring the cake.\n\n" * 3,
        "question": "Dialogue: Carl: the bus is late again. Dana: take a taxi, I will pay.\nSummary:",
        "answers": ["Carl's bus is late, Dana will pay for his taxi."],
        "length": 60,
        "dataset": "samsum",
        "language": "en",
        "all_classes": None,
        "_id": f"local-{i}",
    }
    for i in range(3)
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "standin.txt"
    path.write_text(standin_text(6000, seed=11))
    return str(path)


def _task_utils():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sk_task_utils", suite.TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_data_is_built_at_run_time(tiny_dir, text_file):
    from transformers import AutoTokenizer

    utils = _task_utils()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    meta = {"pretrained": tiny_dir, "text_file": text_file, "max_seq_lengths": [256, 512], "num_samples": 3}
    ppl = utils.ppl_dataset(**meta)["test"]
    assert len(ppl) == 6 and sorted(set(ppl["max_length"])) == [256, 512]
    for row in ppl:
        assert abs(len(tok(row["text"]).input_ids) - row["max_length"]) <= 8
    keys = utils.passkey_dataset(**meta)["test"]
    assert len(keys) == 6
    for row in keys:
        assert (
            row["input"].count(row["answer"]) == 2 and abs(len(tok(row["input"]).input_ids) - row["max_length"]) <= 40
        )
        assert utils.passkey_score(row, [f" {row['answer']}. Remember"])["acc"] == 1.0
        assert utils.passkey_score(row, [" 1234"])["acc"] == 0.0


def test_text_sources(text_file, monkeypatch):
    utils = _task_utils()
    assert utils.find_text(text_file)[1] == text_file
    monkeypatch.setenv("SQUEEZEKIT_TEXT", text_file)
    assert utils.find_text()[1] == text_file
    assert len(utils.pydoc_text()) > 100_000  # the fallback that ships with Python


def test_longbench_code_path_on_local_jsonl(tiny_dir, tmp_path):
    """lm-eval's own longbench_samsum task (prompt, metric) with a local jsonl instead of the hub dataset."""
    pytest.importorskip("rouge")
    import lm_eval
    import lm_eval.tasks.longbench as longbench
    from lm_eval.tasks import TaskManager
    from squeezekit.evaluators.lm_eval_adapter import SqueezekitLM

    data = tmp_path / "samsum.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in LONGBENCH_DOCS))
    samsum = Path(longbench.__path__[0]) / "samsum.yaml"
    (tmp_path / "samsum_local.yaml").write_text(
        f"include: {samsum}\ntask: longbench_samsum_local\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f'dataset_kwargs:\n  data_files:\n    test: {data}\ngeneration_kwargs:\n  max_gen_toks: 8\n  until: ["\\n"]\n'
        "  do_sample: false\n"
    )
    lm = SqueezekitLM(pretrained=tiny_dir, device="cpu", batch_size=2, allocator="squeeze", evictor="h2o", budget=0.3)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["longbench_samsum_local"], task_manager=TaskManager(include_path=str(tmp_path)), limit=2
    )
    res = out["results"]["longbench_samsum_local"]
    assert "rouge_score,none" in res and 0.0 <= res["rouge_score,none"] <= 1.0
    assert lm.kv_bytes["prefills"] >= 1 and lm.kv_bytes["kept"] < 0.5 * lm.kv_bytes["full"]


def test_sweep_cli_resumes_and_reports(tiny_dir, text_file, tmp_path, monkeypatch):
    from squeezekit.cli import main

    out = tmp_path / "results"
    args = ["eval", "--sweep", "--model", tiny_dir, "--text-file", text_file, "--out", str(out), "--batch-size", "2",
            "--suite", "squeezekit_passkey@256:2,squeezekit_ppl@256:2", "--allocators", "uniform,squeeze",
            "--evictors", "streaming", "--budgets", "0.5,1"]  # fmt: skip
    assert main(args) == 0
    assert sorted(os.listdir(out)) == ["quality_vs_budget.png", "results.json", "results.md"]  # no lock file left
    data = json.loads((out / "results.json").read_text())
    assert set(data["cells"]) == {"full", "uniform+streaming@0.5", "squeeze+streaming@0.5"}  # budget 1 once
    for cell in data["cells"].values():
        assert set(cell["units"]) == {"squeezekit_passkey@256:2", "squeezekit_ppl@256:2"}
        assert all(len(u["scores"]) == 2 for u in cell["units"].values())
    table = (out / "results.md").read_text()
    assert "| squeeze | streaming | 0.5 |" in table and "| (any) | (any) | 1 |" in table
    assert (out / "quality_vs_budget.png").stat().st_size > 5000

    def boom(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(Evaluator, "run", boom)
    assert main(args) == 0  # everything is there already: nothing runs


def test_single_config_eval_prints_its_scores_and_progress_and_writes_nothing(
    tiny_dir, text_file, tmp_path, monkeypatch, capsys
):
    from squeezekit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SQUEEZEKIT_PROGRESS", raising=False)
    args = ["eval", "--model", tiny_dir, "--text-file", text_file, "--batch-size", "2", "--device", "cpu", "--suite",
            "squeezekit_passkey@256:2,squeezekit_ppl@256:2", "--evictor", "h2o", "--budget", "0.5"]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()  # stderr is not a terminal here: progress comes as plain lines
    assert out.startswith("squeeze+h2o@0.5: squeezekit_passkey@256:2 ") and "KV kept" in out and out.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # not docs/results, nor anything else of the current folder
    lines = err.splitlines()
    assert f"squeezekit: loading the model {tiny_dir}" in lines
    assert any(line.startswith("squeezekit: eval 0/2 units (0%), ") for line in lines)
    assert any(line.startswith("squeezekit: eval 2/2 units (100%), ") for line in lines)
    for unit in ("squeezekit_passkey@256:2", "squeezekit_ppl@256:2"):  # within each unit: its samples
        assert any(line.startswith(f"squeezekit: squeeze+h2o@0.5 {unit} 2/2 samples (100%), ") for line in lines)
    for theirs in ("Loading weights", "Running generate_until requests", "Running loglikelihood requests", "WARNING"):
        assert theirs not in err  # transformers' and lm-eval's own bars and warnings


def test_suite_parsing_errors():
    from squeezekit.errors import ConfigError

    assert suite.parse_suite("niah_single_1@1024:8") == [suite.Unit("niah_single_1", 1024, 8)]
    with pytest.raises(ConfigError, match="unknown task"):
        suite.parse_suite("hellaswag@1024:8")
    with pytest.raises(ConfigError, match="TASK@LENGTH:N"):
        suite.parse_suite("niah_single_1:8")


def test_ruler_units_build_only_their_samples(tiny_dir):
    """A unit of N RULER samples builds N (not lm-eval's 500), whatever was loaded before; outside a load the
    generators build what lm-eval asks."""
    for n in (2, 3, 2):
        loaded = suite.load_unit(suite.Unit("niah_single_1", 512, n), tiny_dir)
        (task,) = loaded["tasks"].values()
        assert len(task.dataset["test"]) == n
    assert suite._CAP is None


def test_every_process_builds_the_same_samples(tiny_dir, text_file):
    """RULER draws its samples from Python's global random generator: a unit's samples are the same in every process
    (the shards of a sweep, a resumed run), N of them the first N of a larger unit's, and the caller's random state is
    left as it was."""
    import random
    import subprocess
    import sys

    def docs(loaded):
        (task,) = loaded["tasks"].values()
        return [json.dumps(d, sort_keys=True, default=str) for d in task.eval_docs]

    code = (
        "import sys, random; from squeezekit.evaluators import suite; random.seed(int(sys.argv[3])); "
        "u = suite.Unit(sys.argv[1], 512, 3); print(suite.samples_fingerprint(suite.load_unit(u, sys.argv[2], "
        "sys.argv[4]), 3))"
    )
    for task in ("niah_single_1", "ruler_fwe", "squeezekit_passkey"):
        prints = {
            subprocess.run([sys.executable, "-c", code, task, tiny_dir, str(seed), text_file], capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
            for seed in (1, 2)
        }  # fmt: skip
        assert len(prints) == 1, (task, prints)
        state = random.getstate()
        three = suite.load_unit(suite.Unit(task, 512, 3), tiny_dir, text_file)
        assert random.getstate() == state
        assert prints == {suite.samples_fingerprint(three, 3)}
        two = suite.load_unit(suite.Unit(task, 512, 2), tiny_dir, text_file)
        assert docs(two) == docs(three)[:2]


@pytest.mark.parametrize("blind", [False, True])
def test_multiquestion_tasks_ask_every_question_after_one_compression(tiny_dir, text_file, blind):
    utils = _task_utils()
    meta = {"pretrained": tiny_dir, "text_file": text_file, "max_seq_lengths": [256], "num_samples": 3}
    rows = (utils.multiquestion_blind_dataset if blind else utils.multiquestion_dataset)(**meta)["test"]
    assert len(rows) == 3
    for row in rows:
        text = row["input"]
        head, rest = text.split(utils.COMPRESS_MARK)
        assert text.count(utils.COMPRESS_MARK) == 1 and text.count(utils.ANSWER_MARK) == 4
        assert ("Question:" in head) is not blind  # the first question is compressed with the context, or not
        assert all(f"door is {key}." in head for key in row["answers"])  # every key is in the compressed part
        assert len(set(row["answers"])) == 4 and all(0.05 <= d <= 0.95 for d in row["depths"])
        right = utils.ANSWER_MARK.join([f" {row['answers'][0]}.", " 1", f" {row['answers'][2]}33", ""])
        assert utils.multiquestion_score(row, [right]) == {"acc": 0.5, "acc_first": 1.0, "acc_later": 1 / 3}
        wrong = utils.ANSWER_MARK.join([f" {row['answers'][0][:-1]}"] * 4)  # a key cut short is wrong
        assert utils.multiquestion_score(row, [wrong])["acc"] == 0.0


def _plain_conversation(model, tok, text: str, utils, max_gen: int) -> str:
    """The multi-question protocol on plain transformers (full cache): the reference of budget 1."""
    import torch
    from transformers import DynamicCache

    head, rest = text.split(utils.COMPRESS_MARK)
    cache, answers = DynamicCache(), []
    with torch.no_grad():
        logits = model(torch.tensor([tok(head)["input_ids"]]), past_key_values=cache, use_cache=True).logits[0, -1]
        for segment in rest.split(utils.ANSWER_MARK)[:-1]:
            new = tok.encode(segment, add_special_tokens=False)
            if new:
                logits = model(torch.tensor([new]), past_key_values=cache, use_cache=True).logits[0, -1]
            tokens = []
            while len(tokens) < max_gen and int(logits.argmax()) != tok.eos_token_id:
                tokens.append(int(logits.argmax()))
                logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
                if "\n" in tok.decode(tokens):
                    break
            answers.append(tok.decode(tokens).split("\n")[0])
    return utils.ANSWER_MARK.join(answers)


def test_multiquestion_conversation_is_plain_transformers_at_full_budget_and_compresses_once(tiny_dir, text_file):
    from squeezekit.evaluators.lm_eval_adapter import SqueezekitLM

    from squeezekit.config import Config

    utils = _task_utils()
    meta = {"pretrained": tiny_dir, "text_file": text_file, "max_seq_lengths": [256], "num_samples": 2}
    rows = utils.multiquestion_blind_dataset(**meta)["test"]
    lm = SqueezekitLM(pretrained=tiny_dir, budget=1.0, device="cpu", extend_chunk=3)
    kwargs = {"until": ["\n"], "max_gen_toks": 5}
    for row in rows:
        expected = _plain_conversation(lm.model, lm.tokenizer, row["input"], utils, 5)
        got = lm._conversation(row["input"], kwargs)
        assert got == expected and got.count(utils.ANSWER_MARK) == 3
    lm.squeeze_config = Config.from_kwargs(allocator="uniform", evictor="snapkv", budget=0.3)
    lm.kv_bytes = {"kept": 0, "full": 0, "prefills": 0}
    answers = lm._conversation(rows[0]["input"], kwargs).split(utils.ANSWER_MARK)
    assert len(answers) == 4 and lm.kv_bytes["prefills"] == 1  # one compression for all four questions
    assert 0.2 < lm.kv_bytes["kept"] / lm.kv_bytes["full"] < 0.4


def test_multiquestion_units_score_first_and_later_questions(tiny_dir, text_file):
    from squeezekit.config import Config

    unit = suite.parse_suite("squeezekit_multiquestion@256:2")[0]
    assert unit.kind == "multiquestion"
    ev = Evaluator(tiny_dir, batch_size=2, text_file=text_file)
    result = ev.run(Config.from_kwargs(allocator="uniform", evictor="snapkv", budget=0.3), unit)
    assert result["n"] == 2 and len(result["first"]) == len(result["later"]) == 2
    for s, f, later in zip(result["scores"], result["first"], result["later"], strict=True):
        assert s == pytest.approx((f + 3 * later) / 4)
