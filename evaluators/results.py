"""The evaluation results store: ``OUT/results.json``, written after every unit, shared by the shards of a sweep.

One store holds the results of one *setting*: the model (a fingerprint of its files), the text the perplexity and
pass key tasks are built from (a fingerprint of its content), and the adapter settings that change scores (batch
size, extend chunk, rolling prompt share, device, dtype). A store holding another setting's results is refused with
one line, never mixed. Within it, a cell is a config (its label; ``full`` for the full cache, the same for every
allocator and evictor) and a unit is ``TASK@LENGTH:N``, so nothing that decides a score is left out of its key.

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

FORMAT = 2
SOURCE = "command line"


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
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                "--out", str(self.dir), f"holds a results.json that cannot be read ({exc})", SOURCE
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(
                "--out",
                str(self.dir),
                "holds results of an older squeezekit (results.json format 1); use another --out",
                SOURCE,
            )
        theirs = data.get("meta", {})
        differ = [k for k in self.identity if theirs.get(k) != self.identity[k]]
        if differ:
            what = ", ".join(f"{k} {theirs.get(k)!r} (now {self.identity[k]!r})" for k in differ)
            raise ConfigError(
                "--out", str(self.dir), f"holds results of another setting: {what}; use another --out", SOURCE
            )
        return data

    @property
    def cells(self) -> dict[str, dict]:
        return self.data["cells"]

    def has(self, config, unit) -> bool:
        return unit.key in self.cells.get(cell_key(config), {}).get("units", {})

    def put(self, config, unit, result: dict) -> None:
        """Record one unit's result and merge the file under a lock (shards of one sweep write it concurrently)."""
        cell = {"config": config.as_dict(), "describe": config.describe(), "units": {unit.key: result}}
        self.data = self._merge({cell_key(config): cell})

    def save(self) -> None:
        self.data = self._merge({})

    def _merge(self, cells: dict[str, dict]) -> dict:
        if self.dir is None:
            return _merged(self.data, cells)
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            merged = _merged(self._load(), cells)  # another shard may have written since
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


def _merged(data: dict, cells: dict[str, dict]) -> dict:
    """``data`` with each cell's units added (a cell not there yet is created)."""
    for key, cell in cells.items():
        into = data["cells"].setdefault(key, {k: v for k, v in cell.items() if k != "units"} | {"units": {}})
        into["units"].update(cell["units"])
    return data
