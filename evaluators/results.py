"""The evaluation results store: ``OUT/results.json``, written after every unit, shared by the shards of a sweep.

One store holds the results of one *setting*: the model (a fingerprint of its files), the text the perplexity and
pass key tasks are built from (a fingerprint of its content), and the adapter settings that change scores (batch
size, extend chunk, rolling prompt share, device, dtype). A store holding another setting's results is refused with
one line, never mixed. Within it, a cell is a config (its label; ``full`` for the full cache, the same for every
allocator and evictor) and a unit is ``TASK@LENGTH:N``, so nothing that decides a score is left out of its key.
A cell also records a content fingerprint of every file its config names (a calibration ``profile=FILE``): a file
rewritten at the same path makes the cell's results stale, and the sweep runs its units again (`file_fingerprints`).
A unit's result records a fingerprint of the samples it was scored on (`squeezekit.evaluators.suite.
samples_fingerprint`; every process builds the same ones, `suite.seeded`): a unit scored on other samples than the
store's other cells scored it on is refused in one line, since the reports pair cells sample by sample.

A store is checked whole when it is read: anything but the structure squeezekit writes (a cell without units, a unit
without scores, a list where a mapping belongs) is refused in one line naming the file and the place, never half
used.

Writers take an exclusive ``flock`` on the results folder itself (no lock file is left behind) and replace
``results.json`` atomically. A store without a folder (``out_dir=None``) lives in memory only: a single-config
``squeezekit eval`` without ``--out`` prints its scores and writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from squeezekit.errors import ConfigError
from squeezekit.files import read_bytes

FORMAT = 2
SOURCE = "command line"
#: the largest results.json read (the 85-cell H200 sweep's is 0.3 MB)
MAX_STORE_BYTES = 1 << 30


def cell_key(config) -> str:
    """The config's label (``squeeze+h2o@0.2``, plus ``/KEY=VALUE`` for any other key), ``full`` for budget 1."""
    return "full" if config.full else config.label


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """A fingerprint of a model directory: its config, tokenizer files, and each weight file's size and first and
    last MiB (fast, and different for any two checkpoints that differ in practice)."""
    root = Path(model_dir)
    parts: list[bytes] = []
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        parts.append(path.name.encode())
        if path.suffix in (".json", ".txt", ".model", ".jinja"):
            parts.append(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(1 << 20)
                f.seek(max(0, size - (1 << 20)))
                parts += [str(size).encode(), head, f.read(1 << 20)]
    return _digest(*parts)


def text_fingerprint(text: str) -> str:
    return _digest(text.encode("utf-8", errors="replace"))


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_fingerprints(config) -> dict[str, str]:
    """``{key: fingerprint}`` of every plugin parameter of ``config`` whose value names a regular file (the
    ``calibrated`` allocator's ``profile=FILE``, or any plugin's file): a cell's scores depend on the file's content,
    which its label (the path) does not show. None for the full cache: budget 1 evicts nothing, whatever the files
    say."""
    if config.full:
        return {}
    return {
        key: _file_digest(value)
        for key, value in config.params
        if isinstance(value, str) and value and os.path.isfile(value)
    }


#: what `_kind` says of a key that is not there
MISSING = object()


def _kind(value: Any) -> str:
    """``value``'s JSON type in words (``missing`` for `MISSING`)."""
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unit_problem(unit: Any) -> tuple[str, str] | None:
    """``(where, what)`` is wrong with one unit's result, or None."""
    if not isinstance(unit, dict):
        return "", f"is {_kind(unit)}, expected a mapping"
    for key in ("value", "stderr"):
        if not _number(unit.get(key)):
            return f"[{key!r}]", f"is {_kind(unit.get(key, MISSING))}, expected a number"
    scores = unit.get("scores", MISSING)
    if not isinstance(scores, list):
        return "['scores']", f"is {_kind(scores)}, expected a list of numbers"
    bad = next((i for i, x in enumerate(scores) if not _number(x)), None)
    if bad is not None:
        return f"['scores'][{bad}]", f"is {_kind(scores[bad])}, expected a number"
    if unit.get("kv_fraction") is not None and not _number(unit["kv_fraction"]):
        return "['kv_fraction']", f"is {_kind(unit['kv_fraction'])}, expected a number or null"
    if unit.get("samples") is not None and not isinstance(unit["samples"], str):
        return "['samples']", f"is {_kind(unit['samples'])}, expected a samples fingerprint (a string) or null"
    return None


def _cell_problem(key: str, cell: Any) -> tuple[str, str] | None:
    """``(where, what)`` is wrong with one cell, or None."""
    if not isinstance(cell, dict):
        return "", f"is {_kind(cell)}, expected a mapping"
    config = cell.get("config", MISSING)
    if not isinstance(config, dict):
        return "['config']", f"is {_kind(config)}, expected a mapping of config keys"
    if key != "full" and not _number(config.get("budget")):
        return "['config']['budget']", f"is {_kind(config.get('budget', MISSING))}, expected a number"
    for name, value in config.items():
        wanted = str if name in ("allocator", "evictor") else (str, int, float)
        if not isinstance(value, wanted):
            return f"['config'][{name!r}]", f"is {_kind(value)}, expected {'a name' if wanted is str else 'a value'}"
    prints = cell.get("fingerprints", {})
    if not isinstance(prints, dict) or not all(isinstance(v, str) for v in prints.values()):
        return "['fingerprints']", "is not a mapping of keys to fingerprints"
    units = cell.get("units", MISSING)
    if not isinstance(units, dict):
        return "['units']", f"is {_kind(units)}, expected a mapping of unit keys to results"
    for name, unit in units.items():
        problem = _unit_problem(unit)
        if problem:
            return f"['units'][{name!r}]{problem[0]}", problem[1]
    return None


def store_problem(data: dict) -> str | None:
    """What is wrong with the structure of a results store (format `FORMAT`), in words; None when nothing is."""
    if not isinstance(data.get("meta"), dict):
        return f"'meta' is {_kind(data.get('meta', MISSING))}, expected a mapping"
    cells = data.get("cells", MISSING)
    if not isinstance(cells, dict):
        return f"'cells' is {_kind(cells)}, expected a mapping of cell keys to cells"
    for key, cell in cells.items():
        problem = _cell_problem(key, cell)
        if problem:
            return f"cells[{key!r}]{problem[0]} {problem[1]}"
    return None


class ResultStore:
    """``OUT/results.json`` for one setting (``identity``): see the module docstring."""

    def __init__(self, out_dir: str | Path | None, identity: dict[str, Any]):
        self.dir = None if out_dir is None else Path(out_dir)
        self.path = None if self.dir is None else self.dir / "results.json"
        self.identity = identity
        self.data = self._load()

    def _load(self) -> dict:
        if self.path is None or not self.path.exists():
            return {"format": FORMAT, "meta": dict(self.identity), "cells": {}}
        data = self._read()
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(
                "--out",
                str(self.dir),
                "holds results of an older squeezekit (results.json format 1); use another --out",
                SOURCE,
            )
        problem = store_problem(data)
        if problem:
            raise ConfigError(
                "--out", str(self.dir), f"holds a malformed results.json: {problem}; use another --out", SOURCE
            )
        theirs = data["meta"]
        differ = [k for k in self.identity if theirs.get(k) != self.identity[k]]
        if differ:
            what = ", ".join(f"{k} {theirs.get(k)!r} (now {self.identity[k]!r})" for k in differ)
            raise ConfigError(
                "--out", str(self.dir), f"holds results of another setting: {what}; use another --out", SOURCE
            )
        return data

    def _read(self) -> Any:
        """The parsed ``results.json`` (a regular file only: a FIFO or a device there is never opened)."""
        assert self.path is not None
        try:
            return json.loads(read_bytes(self.path, "results.json", MAX_STORE_BYTES))
        except ConfigError as exc:  # not a regular file, too large, unreadable
            problem = exc.accepted.partition(";")[0]
        except ValueError as exc:  # not JSON, or not UTF-8
            problem = f"not JSON: {exc}"
        raise ConfigError(
            "--out", str(self.dir), f"holds a results.json that cannot be read ({problem}); use another --out", SOURCE
        )

    @property
    def cells(self) -> dict[str, dict]:
        return self.data["cells"]

    def has(self, config, unit) -> bool:
        return unit.key in self.cells.get(cell_key(config), {}).get("units", {})

    def stale(self, config) -> str | None:
        """Why the results recorded for ``config`` were computed with other files than it names now (one line), or
        None: every file it names has the content its cell recorded (or nothing is recorded for it)."""
        cell = self.cells.get(cell_key(config))
        if cell is None:
            return None
        then, now = cell.get("fingerprints", {}), file_fingerprints(config)
        changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
        if not changed:
            return None
        files = ", ".join(f"{k}={dict(config.params).get(k, '')}" for k in changed)
        how = "may have changed (not fingerprinted then)" if any(k not in then for k in changed) else "has changed"
        return f"{cell_key(config)}: {files} {how} since its {len(cell['units'])} recorded units were computed"

    def put(self, config, unit, result: dict) -> None:
        """Record one unit's result and merge the file under a lock (shards of one sweep write it concurrently). A
        cell recorded with other file fingerprints is replaced, not added to."""
        cell = {
            "config": config.as_dict(), "describe": config.describe(), "fingerprints": file_fingerprints(config),
            "units": {unit.key: result},
        }  # fmt: skip
        self.data = self._merge({cell_key(config): cell})

    def drop(self, config) -> None:
        """Forget every result of ``config``'s cell (stale: see `stale`)."""
        self.data = self._merge({}, drop=[cell_key(config)])

    def save(self) -> None:
        self.data = self._merge({})

    def _merge(self, cells: dict[str, dict], drop: list[str] | tuple[str, ...] = ()) -> dict:
        if self.dir is None:
            return _merged(self.data, cells, drop, "(in memory)")
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            merged = _merged(self._load(), cells, drop, str(self.dir))  # another shard may have written since
            self._write(merged)
        return merged

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the results folder itself, held until the block ends."""
        assert self.dir is not None
        fd = os.open(self.dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, data: dict) -> None:
        """Replace ``results.json`` atomically (a reader sees the old file or the new one, never half of one)."""
        assert self.path is not None
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _other_samples(data: dict, unit: str, samples: str | None) -> str | None:
    """The samples fingerprint another cell of ``data`` recorded for ``unit`` when it is not ``samples`` (results
    written before fingerprints were recorded are not compared), else None."""
    if samples is None:
        return None
    for cell in data["cells"].values():
        theirs = cell["units"].get(unit, {}).get("samples")
        if theirs is not None and theirs != samples:
            return str(theirs)
    return None


def _merged(data: dict, cells: dict[str, dict], drop: list[str] | tuple[str, ...] = (), where: str = "") -> dict:
    """``data`` without the cells ``drop`` and with each of ``cells``' units added (a cell not there yet, or there
    with other file fingerprints, is created anew). A unit scored on other samples than the store's other cells
    scored it on is refused (``where``: the store's folder, for the message): the comparisons pair cells by sample."""
    for key in drop:
        data["cells"].pop(key, None)
    for key, cell in cells.items():
        for unit, result in cell["units"].items():
            other = _other_samples(data, unit, result.get("samples"))
            if other:
                raise ConfigError(
                    "--out", where, f"holds {unit} scored on other samples (fingerprint {other}, now "
                    f"{result['samples']}): its cells would not be paired; use another --out", SOURCE,
                )  # fmt: skip
        into = data["cells"].get(key)
        if into is None or into.get("fingerprints", {}) != cell.get("fingerprints", {}):
            into = data["cells"][key] = {k: v for k, v in cell.items() if k != "units"} | {"units": {}}
        into["units"].update(cell["units"])
    return data
