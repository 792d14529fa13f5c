"""The offline evaluation suite: which tasks exist, how a unit ``TASK@LENGTH:N`` is parsed and loaded.

Tasks are lm-eval's offline RULER tasks (``niah_single_1``, ``niah_multikey_2``, ``niah_multikey_3``, ``ruler_vt``,
``ruler_cwe``, ``ruler_fwe``) and squeezekit's own (``squeezekit_ppl``: perplexity, ``squeezekit_passkey``: pass key
retrieval; ``squeezekit_multiquestion`` and ``squeezekit_multiquestion_blind``: four pass keys asked one after another
against one compressed cache, the first question compressed with the context or the context compressed
question-blind; YAMLs in ``squeezekit/evaluators/tasks``, data built at run time from a local public-domain text, see
tasks/utils.py). A unit is N samples of a task at prompts of about LENGTH tokens.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

from squeezekit.errors import ConfigError

RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
OWN_TASKS = ("squeezekit_ppl", "squeezekit_passkey", "squeezekit_multiquestion", "squeezekit_multiquestion_blind")
TASKS_DIR = Path(__file__).parent / "tasks"
#: generation length per task: enough for the answer (RULER's own defaults generate up to 128 tokens)
MAX_GEN_TOKS = {
    "niah_single_1": 12,
    "niah_multikey_2": 12,
    "niah_multikey_3": 40,
    "ruler_vt": 30,
    "ruler_cwe": 60,
    "ruler_fwe": 20,
    "squeezekit_passkey": 8,
    "squeezekit_multiquestion": 8,
    "squeezekit_multiquestion_blind": 8,
}
DEFAULT_SUITE = (
    "niah_single_1@1024:8,niah_single_1@2048:4,ruler_fwe@1024:4,squeezekit_passkey@1024:8,squeezekit_ppl@1024:4"
)
#: the shortest prompt a unit may ask for (a haystack, a question and room to compress), and the longest
MIN_LENGTH, MAX_LENGTH = 64, 1 << 20
SOURCE = "command line"


@dataclass(frozen=True)
class Unit:
    task: str
    length: int
    n: int

    @property
    def key(self) -> str:
        """``TASK@LENGTH:N``: a unit's results are filed under everything that decides them (N included)."""
        return f"{self.task}@{self.length}:{self.n}"

    @property
    def kind(self) -> str:
        if self.task.startswith("squeezekit_multiquestion"):
            return "multiquestion"
        return "ppl" if self.task == "squeezekit_ppl" else "passkey" if self.task == "squeezekit_passkey" else "ruler"


def parse_suite(text: str) -> list[Unit]:
    """``TASK@LENGTH:N,...`` into units; every malformed item is a one-line `ConfigError`."""
    units = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        try:
            head, n = item.rsplit(":", 1)
            task, length = head.split("@")
            unit = Unit(task, int(length), int(n))
        except ValueError:
            raise ConfigError("--suite", item, "expected TASK@LENGTH:N, e.g. niah_single_1@1024:16", SOURCE) from None
        if unit.task not in RULER_TASKS + OWN_TASKS:
            raise ConfigError(
                "--suite", item, f"unknown task; offline tasks: {', '.join(RULER_TASKS + OWN_TASKS)}", SOURCE
            )
        if not MIN_LENGTH <= unit.length <= MAX_LENGTH:
            raise ConfigError("--suite", item, f"LENGTH must be between {MIN_LENGTH} and {MAX_LENGTH} tokens", SOURCE)
        if unit.n < 1:
            raise ConfigError("--suite", item, "N (samples) must be at least 1", SOURCE)
        units.append(unit)
    if not units:
        raise ConfigError("--suite", text, "expected at least one unit TASK@LENGTH:N", SOURCE)
    if len({u.key for u in units}) != len(units):
        raise ConfigError("--suite", text, "lists a unit twice", SOURCE)
    return units


#: the most samples a RULER generator builds while `capped_ruler_samples` is active (None: as lm-eval asks)
_CAP: int | None = None


@contextlib.contextmanager
def capped_ruler_samples(cap: int):
    """While loading: RULER's generators build at most ``cap`` samples instead of 500 (the first ``cap``: the same
    samples). lm-eval 0.4.13 hard-codes ``num_samples=500`` in its RULER task functions and offers no setting for
    it: there is no public route, so its generators are wrapped, once, by wrappers that read the cap of the active
    block (and ask for what lm-eval asks outside one). Its YAML loader re-executes a task module unless the one in
    ``sys.modules`` carries the file's ``__mtime__`` (lm_eval/tasks/_yaml_loader.py): the wrapped modules get it, or
    the wrappers would be lost."""
    global _CAP
    for name in ("prepare_niah", "niah_utils", "vt_utils", "cwe_utils", "fwe_utils"):
        module = importlib.import_module(f"lm_eval.tasks.ruler.{name}")
        if getattr(module, "__file__", None) and not hasattr(module, "__mtime__"):
            module.__mtime__ = os.stat(module.__file__).st_mtime_ns  # type: ignore[attr-defined]
        for attr, fn in list(vars(module).items()):
            if getattr(fn, "_squeezekit_capped", False) or not callable(fn):
                continue
            if not getattr(fn, "__module__", "").startswith("lm_eval.tasks.ruler") or attr == "get_dataset":
                continue
            try:
                takes = "num_samples" in inspect.signature(fn).parameters
            except (TypeError, ValueError):
                continue
            if takes:
                setattr(module, attr, _capped(fn))
    previous, _CAP = _CAP, cap
    try:
        yield
    finally:
        _CAP = previous


def _capped(fn):
    @functools.wraps(fn)
    def capped(*args, **kwargs):
        if _CAP is not None:
            kwargs["num_samples"] = min(int(kwargs.get("num_samples", 500)), _CAP)
        return fn(*args, **kwargs)

    capped._squeezekit_capped = True  # type: ignore[attr-defined]
    return capped


@contextlib.contextmanager
def seeded(key: str):
    """Python's and numpy's global random generators seeded from ``key`` (a unit's ``TASK@LENGTH``: N samples are
    the first N of any larger unit's) while a unit's samples are built, their states put back after.

    RULER's generators draw needles, keys and haystack positions from the global `random` (lm-eval seeds it in
    ``simple_evaluate``, which the evaluation here does not call): unseeded, every process built other samples, so
    the shards of one sweep and a resumed run scored their cells on different samples, and the comparisons across
    them were not paired."""
    import numpy as np

    seed = int.from_bytes(hashlib.sha256(f"squeezekit-unit:{key}".encode()).digest()[:4], "little")
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def samples_fingerprint(loaded: dict, n: int) -> str:
    """A fingerprint of the first ``n`` documents of each task in a loaded task dict (`load_unit`): two runs scored
    the same samples exactly when they agree."""
    import json

    h = hashlib.sha256()
    for name, task in sorted(loaded["tasks"].items()):
        h.update(name.encode())
        for i, doc in enumerate(task.eval_docs):
            if i >= n:
                break
            h.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def offline_nltk():
    """RULER's niah module asks NLTK to download ``punkt_tab`` at import when it is missing (used for essay haystacks
    only, not the tasks here): never reach for the network (an offline GPU machine would wait on it). The module is
    imported here, once, without the line it prints on stdout then ("Downloaded punkt_tab": nothing was)."""
    try:
        import nltk
    except ImportError:
        yield
        return
    download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module("lm_eval.tasks.ruler.prepare_niah")
        yield
    finally:
        nltk.download = download


def load_unit(
    unit: Unit, model_dir: str | os.PathLike, text_file: str | None = None, max_gen_toks: int | None = None
) -> dict:
    """lm-eval's loaded task dict for ``unit`` (prompts sized with ``model_dir``'s tokenizer), zero-shot, with
    generation cut to what the answers need (``max_gen_toks``, default `MAX_GEN_TOKS`); the same samples in every
    process (`seeded`). A TaskManager indexes only
    RULER's and squeezekit's task folders, with the unit's metadata (TaskManager takes it when it is built)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    model_dir = str(model_dir)  # (lm-eval's task metadata drops what is not plain data: a Path never reaches RULER)
    metadata = {
        "max_seq_lengths": [unit.length],
        "pretrained": model_dir,
        "tokenizer": model_dir,
        "num_samples": unit.n,
    }
    if text_file:
        metadata["text_file"] = text_file
    ruler_dir = Path(lm_eval.tasks.__file__).parent / "ruler"
    manager = TaskManager(include_path=[str(TASKS_DIR), str(ruler_dir)], include_defaults=False, metadata=metadata)
    capped = capped_ruler_samples(unit.n) if unit.kind == "ruler" else contextlib.nullcontext()
    with offline_nltk(), capped, seeded(f"{unit.task}@{unit.length}"):
        try:
            loaded = manager.load([unit.task])
        except ValueError as exc:
            if "Could not generate any sample" not in str(exc):
                raise
            # RULER could not fit its template, needle and answer into LENGTH tokens of this model's tokenizer
            raise ConfigError(
                "--suite", unit.key, "too short for this task with this model's tokenizer (RULER fits no sample into "
                "it); use a larger LENGTH", SOURCE,
            ) from None  # fmt: skip
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        tokens = max_gen_toks or MAX_GEN_TOKS.get(unit.task)
        if task.get_config("output_type") == "generate_until" and tokens:
            task.set_config(key="generation_kwargs", value={"max_gen_toks": tokens}, update=True)
    return loaded
