"""Data for squeezekit's offline tasks, built at run time from a local public-domain text (no hub, no download).

The text is resolved when a task loads (`find_text`): ``--metadata text_file=PATH``, else ``$SQUEEZEKIT_TEXT``, else
the King James Bible of Debian's ``bible-kjv`` package (``bible -f "gen1:1-rev22:21"``, cached as plain text),
else the reST sources of Debian's ``python3.11-doc``, else the topic texts that ship with Python's own ``pydoc``.
Documents are cut to token lengths with the model's tokenizer (``pretrained``/``tokenizer`` from ``--model_args``),
for each of ``max_seq_lengths`` (``--metadata``), like lm-eval's RULER tasks.

A text a user names (``text_file``, ``$SQUEEZEKIT_TEXT``, ``squeezekit calibrate --text``) is read by
`read_text_file`: a regular file of at most 256 MiB (`MAX_TEXT_BYTES`; the King James Bible is 4.4 MiB), so a
missing file, a directory, a FIFO or ``/dev/zero`` is a one-line `squeezekit.ConfigError` naming where the path came
from, never a traceback or a read that blocks or never ends.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

DEFAULT_LENGTHS = [1024]
KJV_RANGE = "gen1:1-rev22:21"
PASSKEY_INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n"
)
PASSKEY_QUESTION = "\nWhat is the pass key?"
PASSKEY_PREFIX = "The pass key is"
#: the largest text `read_text_file` reads
MAX_TEXT_BYTES = 256 << 20
#: the multi-question tasks' turn markers (read by the squeezekit lm-eval model, `SqueezekitLM.generate_until`):
#: the prompt is prefilled and compressed up to COMPRESS_MARK; an answer is generated at each ANSWER_MARK, and the
#: answers come back joined by ANSWER_MARK
COMPRESS_MARK = "<|squeezekit:compress|>"
ANSWER_MARK = "<|squeezekit:answer|>"
#: the doors whose pass keys the multi-question tasks hide (one per question)
DOORS = ("red", "blue", "green", "yellow", "white")
MULTI_INTRO = (
    "There are several pass keys hidden in the following text, one for each door. Find them and memorize them. "
    "I will quiz you about them.\n"
)


def text_cache_dir() -> Path:
    from squeezekit.models import cache_dir

    return cache_dir() / "eval"


def kjv_text() -> str | None:
    """The King James Bible from Debian's bible-kjv (cached after the first call), or None when not installed."""
    cached = text_cache_dir() / "kjv.txt"
    if cached.exists():
        return cached.read_text()
    exe = shutil.which("bible")
    if exe is None:
        return None
    out = subprocess.run([exe, "-f", KJV_RANGE], capture_output=True, text=True, check=False).stdout
    if len(out) < 100_000:
        return None
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(out)
    os.replace(tmp, cached)
    return out


def python_doc_text() -> str | None:
    """The reST sources of Debian's python3.11-doc, concatenated, or None."""
    for root in sorted(Path("/usr/share/doc").glob("python3*-doc/html/_sources")):
        files = sorted(root.rglob("*.txt"))
        if files:
            return "\n\n".join(f.read_text(errors="replace") for f in files)
    return None


def pydoc_text() -> str:
    """Always available: the help topics that ship with Python's pydoc."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text_file(path: str | os.PathLike, key: str, source: str) -> str:
    """The text of the file a user named under ``key`` (from ``source``), bounded (see the module docstring)."""
    from squeezekit.files import read_text

    return read_text(path, key, MAX_TEXT_BYTES, source)


def find_text(text_file: str | None = None) -> tuple[str, str]:
    """(text, name of its source): see the module docstring for the order."""
    if text_file:
        return read_text_file(text_file, "text_file", "metadata"), str(text_file)
    path = os.environ.get("SQUEEZEKIT_TEXT")
    if path:
        return read_text_file(path, "SQUEEZEKIT_TEXT", "environment"), path
    for name, fn in (("bible-kjv", kjv_text), ("python3.11-doc", python_doc_text)):
        text = fn()
        if text:
            return text, name
    return pydoc_text(), "pydoc topics"


@functools.cache
def _tokenizer(name: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, local_files_only=True)


def _setup(kwargs: dict):
    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if not name:
        from squeezekit.models import default_model_dir

        name = str(default_model_dir())
    tok = _tokenizer(str(name))
    text, _ = find_text(kwargs.get("text_file"))
    text = re.sub(r"[ \t]+", " ", text)
    lengths = kwargs.get("max_seq_lengths") or DEFAULT_LENGTHS
    n = int(kwargs.get("num_samples", 50))
    return tok, text, [int(x) for x in lengths], n


@functools.cache
def _ids(tok_name: str, text: str) -> list[int]:
    return _tokenizer(tok_name).encode(text, add_special_tokens=False)


def _slices(tok, text: str, length: int, n: int, seed: int) -> list[list[int]]:
    """``n`` token windows of ``length`` spread over the text (deterministic)."""
    ids = _ids(tok.name_or_path, text)
    if len(ids) < length + 1:
        ids = ids * (length // max(len(ids), 1) + 2)  # a short stand-in text repeats
    span = len(ids) - length
    rng = random.Random(seed + length)
    starts = sorted(rng.randrange(0, span) for _ in range(n)) if n > 1 else [0]
    return [ids[s : s + length] for s in starts]


def ppl_dataset(**kwargs) -> dict:
    """Documents of exactly ``max_seq_lengths`` tokens for loglikelihood_rolling (perplexity)."""
    import datasets  # (here: `squeezekit calibrate` reads texts through this module without it)

    tok, text, lengths, n = _setup(kwargs)
    rows = []
    for length in lengths:
        for window in _slices(tok, text, length, n, seed=1):
            rows.append({"text": tok.decode(window), "max_length": length})
    return {"test": datasets.Dataset.from_list(rows)}


def passkey_dataset(**kwargs) -> dict:
    """A five-digit pass key hidden at depth 5%..95% of a haystack of real text, prompt ~ ``max_seq_lengths``."""
    import datasets

    tok, text, lengths, n = _setup(kwargs)
    rng = random.Random(7)
    rows = []
    for length in lengths:
        overhead = (
            len(tok.encode(PASSKEY_INTRO + PASSKEY_QUESTION + " " + PASSKEY_PREFIX, add_special_tokens=False)) + 24
        )
        for i, window in enumerate(_slices(tok, text, max(length - overhead, 32), n, seed=2)):
            key = str(rng.randrange(10000, 100000))
            needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
            depth = 0.05 + 0.9 * ((i * 0.618034) % 1.0)  # spread evenly over depths, not in order
            cut = int(depth * len(window))
            hay = tok.decode(window[:cut]) + needle + tok.decode(window[cut:])
            rows.append(
                {
                    "input": PASSKEY_INTRO + hay + PASSKEY_QUESTION,
                    "answer": key,
                    "depth": round(depth, 3),
                    "max_length": length,
                }
            )
    return {"test": datasets.Dataset.from_list(rows)}


def passkey_score(doc: dict, results: list[str]) -> dict:
    found = re.findall(r"\d+", results[0])
    return {"acc": 1.0 if found and found[0] == doc["answer"] else 0.0}


def ppl_process_results(doc: dict, results: list[float]) -> dict:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def _multiquestion(blind: bool, questions: int, **kwargs) -> dict:
    """One long context hiding ``questions`` pass keys (one per door) at depths spread over it, and that many
    questions asked one after another against the same compressed cache (in a shuffled order per document). The
    first question is part of the prompt that is compressed (``blind`` False: a query-aware evictor sees it) or
    comes after compression like the later ones (``blind`` True: the context is compressed question-blind)."""
    import datasets

    tok, text, lengths, n = _setup(kwargs)
    rng = random.Random(11)
    rows = []
    for length in lengths:
        doors = DOORS[:questions]
        ask = [f"\nQuestion: What is the pass key of the {d} door?\nAnswer: The pass key of the {d} door is"
               for d in doors]  # fmt: skip
        overhead = len(tok.encode(MULTI_INTRO + "".join(ask), add_special_tokens=False)) + 24 * questions
        for i, window in enumerate(_slices(tok, text, max(length - overhead, 32), n, seed=3)):
            keys = [str(rng.randrange(10000, 100000)) for _ in doors]
            # depths spread evenly over (5%, 95%), shifted per document, in order of the doors
            base = (i * 0.618034) % 1.0 / questions
            depths = [0.05 + 0.9 * (base + q / questions) for q in range(questions)]
            pieces, last = [], 0
            for d, key, depth in zip(doors, keys, depths, strict=True):
                cut = int(depth * len(window))
                pieces.append(tok.decode(window[last:cut]))
                pieces.append(f" The pass key of the {d} door is {key}. Remember it. ")
                last = cut
            pieces.append(tok.decode(window[last:]))
            order = list(range(questions))
            rng.shuffle(order)
            turns = [ask[q] + ANSWER_MARK for q in order]
            prompt = MULTI_INTRO + "".join(pieces)
            if blind:
                text_in = prompt + COMPRESS_MARK + "".join(turns)
            else:
                text_in = prompt + turns[0].replace(ANSWER_MARK, COMPRESS_MARK + ANSWER_MARK) + "".join(turns[1:])
            rows.append({
                "input": text_in,
                "answers": [keys[q] for q in order],
                "depths": [round(depths[q], 3) for q in order],
                "max_length": length,
            })  # fmt: skip
    return {"test": datasets.Dataset.from_list(rows)}


def multiquestion_dataset(**kwargs) -> dict:
    """Four questions about one context; the first is compressed with the context (`_multiquestion`)."""
    return _multiquestion(False, int(kwargs.pop("questions", 4)), **kwargs)


def multiquestion_blind_dataset(**kwargs) -> dict:
    """Four questions about one context compressed question-blind (`_multiquestion`)."""
    return _multiquestion(True, int(kwargs.pop("questions", 4)), **kwargs)


def multiquestion_score(doc: dict, results: list[str]) -> dict:
    """Accuracy over all questions, on the first one and on the later ones (the answers split at ANSWER_MARK). An
    answer is right when it contains its key, as RULER scores retrieval (a small model often runs on past the key's
    digits once the text after it is evicted: ``7103333`` for ``71033``)."""
    answers = results[0].split(ANSWER_MARK)
    right = [1.0 if i < len(answers) and key in answers[i] else 0.0 for i, key in enumerate(doc["answers"])]
    return {"acc": sum(right) / len(right), "acc_first": right[0], "acc_later": sum(right[1:]) / len(right[1:])}
