"""`Evaluator`: a model loaded once as lm-eval's ``squeezekit`` model, plus the suite's task data loaded once;
`Evaluator.run` evaluates one unit under one config (swapping only the compression config).

Progress is squeezekit's own (`squeezekit.progress`, on a terminal and off it): the samples of the unit being
evaluated, counted as lm-eval's model answers them. lm-eval's per-request bars and its warnings about its own
command line (``--metadata``) are left out of ``squeezekit eval``'s output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator

from squeezekit.progress import Progress, status
from squeezekit.progress import progress as progress_of

from .reports import _sd
from .results import cell_key
from .suite import Unit, load_unit, samples_fingerprint


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's loggers at ERROR for the block: its warnings name its own command line's options."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _answered(bar: Progress | None):
    """An lm-eval cache hook (the model calls it once per answered request) that counts into ``bar``."""
    from lm_eval.api.model import CacheHook

    class Answered(CacheHook):
        def add_partial(self, attr, req, res) -> None:
            if bar is not None:
                bar.update(1)

    return Answered(None)


class Evaluator:
    def __init__(
        self,
        model_dir: str | None,
        batch_size: int = 4,
        text_file: str | None = None,
        extend_chunk: int | None = None,
        **model_args,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from squeezekit.models import default_model_dir

        from .lm_eval_adapter import SqueezekitLM

        self.model_dir = str(model_dir or default_model_dir())
        self.text_file = text_file
        extra = {} if extend_chunk is None else {"extend_chunk": extend_chunk}
        self.lm = SqueezekitLM(pretrained=self.model_dir, batch_size=batch_size, budget=1.0, **extra, **model_args)
        self.lm.show_bars = False  # squeezekit's own progress instead (see the module docstring)
        self._loaded: dict[str, dict] = {}
        self._samples: dict[str, str] = {}  # each loaded unit's samples fingerprint

    def run(self, config, unit: Unit, progress: bool = False) -> dict:
        """Evaluate one unit under one config: per-sample scores and their summary. ``progress``: show the unit's
        samples as they are answered (`squeezekit.progress`)."""
        from lm_eval.evaluator import evaluate

        with quiet_lm_eval():
            if unit.key not in self._loaded:
                if progress:
                    status(f"building the {unit.n} samples of {unit.key}")
                self._loaded[unit.key] = load_unit(unit, self.model_dir, self.text_file)
                self._samples[unit.key] = samples_fingerprint(self._loaded[unit.key], unit.n)
            self.lm.squeeze_config = config
            self.lm.kv_bytes = {"kept": 0, "full": 0, "prefills": 0}
            t0 = time.time()
            bar = progress_of(unit.n, f"{cell_key(config)} {unit.key}", "sample") if progress else None
            with bar if bar is not None else contextlib.nullcontext():
                self.lm.set_cache_hook(_answered(bar))
                out = evaluate(
                    lm=self.lm,
                    task_dict=self._loaded[unit.key],
                    limit=unit.n,
                    log_samples=True,
                    bootstrap_iters=0,
                    verbosity="ERROR",
                )
        seconds = time.time() - t0
        samples = sorted(next(iter(out["samples"].values())), key=lambda s: s["doc_id"])
        if unit.kind == "ppl":
            pairs = [s["word_perplexity"] for s in samples]
            scores = [-ll / words for ll, words in pairs]  # per-document NLL per word
            total_ll, total_words = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            value = math.exp(-total_ll / total_words)
            result = {
                "metric": "word_perplexity",
                "value": value,
                "stderr": value * _sd(scores) / math.sqrt(len(scores)),
            }
        else:
            metric = "acc" if unit.kind in ("passkey", "multiquestion") else str(unit.length)
            scores = [float(s[metric]) for s in samples]
            mean = sum(scores) / len(scores)
            result = {"metric": "accuracy", "value": mean, "stderr": _sd(scores) / math.sqrt(len(scores))}
            if unit.kind == "multiquestion":  # per sample: the first question's score and the later ones' mean
                result["first"] = [float(s["acc_first"]) for s in samples]
                result["later"] = [float(s["acc_later"]) for s in samples]
        kv = self.lm.kv_bytes
        result.update(
            n=len(scores),
            samples=self._samples[unit.key],
            scores=scores,
            seconds=round(seconds, 1),
            kv_fraction=(kv["kept"] / kv["full"]) if kv["full"] else None,
        )
        return result
