"""Offline quality evaluation: one config or a sweep of allocator x evictor x head split x budget, through lm-eval.

The model and the task data are built once; each cell only swaps the compression config. Results go to
``OUT/results.json`` after every unit (a rerun skips what is there: resumable; see results.py for what a store
holds), then ``results.md`` and ``quality_vs_budget.png``; a cell whose config names a file that has changed since
(a calibration profile rewritten at the same path) runs again. Per-sample scores are kept, so any two cells can be
compared pairwise (reports.py).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from squeezekit.errors import ConfigError

from .results import SOURCE, ResultStore, cell_key, model_fingerprint, text_fingerprint
from .suite import Unit

SWEEP_BUDGETS = (0.1, 0.14, 0.2, 0.28, 0.4, 1.0)
#: the order cells run in: the full cache, then the budgets the targets compare, then the rest
PRIORITY = (1.0, 0.2, 0.4, 0.14, 0.28, 0.1)


def default_plugins(kind: str) -> tuple[str, ...]:
    """The sweep's default allocators (``kind="allocator"``) or evictors: every policy of that kind squeezekit itself
    ships that the registry loaded, by name, except those that need a parameter no default can give (they do not
    build at their default parameters). That leaves out ``calibrated``, whose profile is made for one model and one
    evictor: a sweep names it itself (``--allocators calibrated --profile 'profiles/{evictor}.json'``). Third-party
    plugins are swept when named (``--allocators``, ``--evictors``), never by default."""
    from squeezekit.errors import SqueezekitError
    from squeezekit.registry import BUNDLED_PACKAGE, registry

    reg = registry()
    table = reg.allocators if kind == "allocator" else reg.evictors
    names = []
    for name, info in sorted(table.items()):
        if info.package != BUNDLED_PACKAGE:
            continue
        try:
            info.cls()
        except SqueezekitError:  # a required parameter
            continue
        names.append(name)
    return tuple(names)


def sweep_configs(allocators, evictors, budgets, params: dict[str, Any] | None = None, heads=("uniform",)) -> list:
    """Every allocator x evictor x head split x budget config; budget 1 (the full cache, identical for all) appears
    once. Each of ``params`` reaches the cells whose plugins take it (one no plugin of the sweep takes is an error);
    ``{evictor}`` and ``{allocator}`` in a value are the cell's (``profile=profiles/{evictor}.json``: one profile per
    evictor)."""
    from squeezekit.config import CORE_KEYS, Config
    from squeezekit.registry import registry

    reg = registry()
    params = dict(params or {})
    core = {k: v for k, v in params.items() if k in CORE_KEYS}
    taken: set[str] = set()
    configs, seen = [], set()
    for budget in budgets:
        for evictor in evictors:
            for allocator in allocators:
                for split in heads:
                    mine = {
                        **reg.get("allocator", allocator, "--sweep").params(),
                        **reg.get("evictor", evictor, "--sweep").params(),
                        **reg.get("heads", split, "--sweep", key="--heads").params(),
                    }
                    cell = {k: _fill(v, allocator, evictor) for k, v in params.items() if k in mine}
                    taken |= cell.keys()
                    c = Config.from_mapping(
                        {**core, "allocator": allocator, "evictor": evictor, "heads": split, "budget": budget, **cell},
                        source="--sweep",
                        text=True,
                    )
                    if cell_key(c) not in seen:
                        seen.add(cell_key(c))
                        configs.append(c)
    unused = sorted(set(params) - taken - set(core))
    if unused:
        raise ConfigError(
            unused[0],
            params[unused[0]],
            "is a parameter of none of the sweep's allocators, evictors and head splits",
            "--sweep",
        )
    order = {b: i for i, b in enumerate(PRIORITY)}
    configs.sort(key=lambda c: (not c.full, order.get(c.budget, len(order)), -c.budget))
    return configs


def _fill(value: Any, allocator: str, evictor: str) -> Any:
    if not isinstance(value, str):
        return value
    return value.replace("{evictor}", evictor).replace("{allocator}", allocator)


def _drop_stale(store: ResultStore, configs) -> None:
    """Forget the results of every cell computed with other files than its config names now (a calibration
    profile rewritten at the same path), saying so in one line each: they run again."""
    for config in configs:
        why = store.stale(config)
        if why:
            print(f"squeezekit: {why}: running them again", file=sys.stderr, flush=True)
            store.drop(config)


def setting(
    model_dir: str,
    text_file: str | None,
    batch_size: int,
    extend_chunk: int,
    rolling_prompt: float,
    device: str,
    dtype: str,
) -> dict[str, Any]:
    """What decides a store's scores besides the config and the unit (see results.py)."""
    from .tasks.utils import find_text  # the same resolution the tasks use

    text, text_name = find_text(text_file)
    return {
        "model": Path(model_dir).name, "model_fingerprint": model_fingerprint(model_dir), "text": text_name,
        "text_fingerprint": text_fingerprint(text), "batch_size": batch_size, "extend_chunk": extend_chunk,
        "rolling_prompt": rolling_prompt, "device": device, "dtype": dtype,
    }  # fmt: skip


def run_sweep(
    configs,
    units: list[Unit],
    out_dir: Path | None,
    model_dir=None,
    batch_size=4,
    text_file=None,
    extend_chunk=None,
    progress=True,
    shard: tuple[int, int] = (0, 1),
    **model_args,
) -> dict:
    """Run every (config, unit) not yet in ``out_dir/results.json``; write the JSON, table and plot. With
    ``out_dir=None`` nothing is read or written: the results are only returned.

    ``device`` and ``dtype`` (in ``model_args``) are checked by `squeezekit.devices.resolve` before anything loads.
    ``progress``: the units, and the samples of each, on stderr (`squeezekit.progress`: a bar on a terminal, a line
    every 10 s elsewhere).
    ``shard=(i, n)`` runs only configs i, i+n, i+2n, ...: n processes (say one per core, each single-threaded)
    share one sweep and one results file.
    """
    from squeezekit.devices import resolve
    from squeezekit.files import check_output_dir
    from squeezekit.models import default_model_dir
    from squeezekit.progress import progress as progress_of
    from squeezekit.progress import quiet_transformers, status

    from .evaluator import Evaluator
    from .lm_eval_adapter import DEFAULT_EXTEND_CHUNK, DEFAULT_ROLLING_PROMPT
    from .reports import write_reports

    device, dtype = resolve(model_args.pop("device", None), model_args.pop("dtype", None), "device", "run_sweep")
    model_args.update(device=device, dtype=dtype)
    if out_dir is not None:
        check_output_dir(out_dir, "--out", SOURCE)  # a file or an unwritable folder: refused now, not after a unit
    model_dir = str(model_dir or default_model_dir())
    identity = setting(
        model_dir,
        text_file,
        batch_size,
        extend_chunk or DEFAULT_EXTEND_CHUNK,
        DEFAULT_ROLLING_PROMPT,
        device.split(":")[0],
        dtype,
    )
    store = ResultStore(out_dir, identity)  # refuses an --out of another setting before anything loads
    configs = configs[shard[0] :: shard[1]]
    _drop_stale(store, configs)
    todo = [(c, u) for c in configs for u in units if not store.has(c, u)]
    total = len(configs) * len(units)
    bar = progress_of(total, "eval", "unit", initial=total - len(todo)) if progress else None
    evaluator = None
    with bar if bar is not None else contextlib.nullcontext():
        for config, unit in todo:
            if evaluator is None:
                quiet_transformers()  # squeezekit's progress, not transformers' weight-loading bar
                if progress:
                    status(f"loading the model {model_dir}")
                evaluator = Evaluator(model_dir, batch_size, text_file, extend_chunk, **model_args)
            if bar is not None:
                bar.set_note(f"{cell_key(config)} {unit.key}")
            store.put(config, unit, evaluator.run(config, unit, progress=progress))
            if bar is not None:
                bar.update(1)
    if out_dir is not None:
        store.save()
        write_reports(store.data, out_dir)
    return store.data
