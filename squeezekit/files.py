"""Reading the files users name, and checking where outputs go, without hanging or losing work.

A path a user gives (a config, a calibration profile or text, a ``--context``, ``$SQUEEZEKIT_TEXT``) may be a FIFO,
a device such as ``/dev/zero``, a directory or a huge file. `read_bytes` looks before it reads: only a regular file,
and at most ``limit`` bytes of it, so nothing blocks on a FIFO or reads forever. `check_output_file` and
`check_output_dir` find out whether an output can be written *before* the work that produces it (by creating it,
which is the only test that also holds for root and for read-only mounts), so a long run never ends in a refused
write. Every problem is a one-line `ConfigError` naming the key (``--text``, ``profile``, ...) and the path.

Nothing here imports torch.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import ConfigError

MIB = 1 << 20


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // 1024} KiB"


def read_bytes(path: str | os.PathLike, key: str, limit: int, source: str | None = None, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (a larger file is refused)."""
    shown = str(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        problem = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot be read: {exc.strerror or exc}"
        raise ConfigError(key, shown, f"{problem}; give a {what}", source) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise ConfigError(key, shown, f"is {kind}; give a {what}", source)
    if info.st_size > limit:
        raise ConfigError(key, shown, f"is larger than {_size(limit)}; give a {what}", source)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(key, shown, f"cannot be read: {exc.strerror or exc}", source) from None
    if len(data) > limit:  # it grew while we looked
        raise ConfigError(key, shown, f"is larger than {_size(limit)}; give a {what}", source)
    return data


def read_text(path: str | os.PathLike, key: str, limit: int, source: str | None = None, what: str = "text file") -> str:
    """`read_bytes` decoded as UTF-8 (undecodable bytes replaced: a text is read, not validated)."""
    return read_bytes(path, key, limit, source, what).decode("utf-8", errors="replace")


def check_output_file(path: str | os.PathLike, key: str, source: str | None = None) -> Path:
    """Make sure ``path`` can be written as a file now (its folder is created); returns it. A file that did not
    exist is removed again after the test."""
    out = Path(path)
    if out.is_dir() or str(path).endswith(os.sep):
        raise ConfigError(key, str(path), "is a directory; give a file name", source)
    existed = out.exists()
    if existed and not out.is_file():
        raise ConfigError(key, str(path), "is not a regular file; give a file name", source)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab"):
            pass
    except FileExistsError:  # (what mkdir says when the folder named is a file)
        raise ConfigError(key, str(path), f"cannot be written: {os.strerror(errno.ENOTDIR)}", source) from None
    except OSError as exc:
        raise ConfigError(key, str(path), f"cannot be written: {exc.strerror or exc}", source) from None
    if not existed:
        out.unlink(missing_ok=True)
    return out


def check_output_dir(path: str | os.PathLike, key: str, source: str | None = None) -> Path:
    """Make sure ``path`` is (or can be created as) a folder that files can be written into now; returns it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(key, str(path), "is a file, not a folder; give a folder for the outputs", source)
    probe = out / f".squeezekit-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise ConfigError(key, str(path), f"cannot be written: {exc.strerror or exc}", source) from None
    return out
