"""The benchmark's models and measuring protocol, shared by ``squeezekit bench``, its kvpress peer and the GPU scripts
of the checkout's benchmarks/ folder.

Random-weight models built from named configs (or a local model directory), device memory and bandwidth probes,
and `run_hf`: transformers' own ``generate`` with its full DynamicCache. It is timed with the figures of the shared
Hugging Face baseline (prefill time = time to the first new token; decode tok/s = B x (N - 1) / the time of the
N - 1 tokens after it), measured within one ``generate(N)`` call: a stopping criterion that stops nothing
(`first_token`) records when the first new token exists (after a device sync on CUDA), so prefill = first token -
start and decode = end - first token. (The baseline's ``generate(1)``, then ``generate(N)`` minus it, puts the noise
of two calls into the difference: on a busy CPU that went to 0 s and the decode rate to 3e10 tok/s.)

Nothing here imports squeezekit's data path or a transformers API beyond ``AutoConfig``, ``AutoModelForCausalLM`` and
``StoppingCriteria``: the kvpress peer imports this module in a process with an older transformers (see
peer_kvpress.py).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

CONFIGS = {
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        sliding_window=None,
    ),
    "llama-2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=32768,
    ),
    "llama-2-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
    ),
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=4096,
    ),
}


def named_config(name: str, layers: int | None = None, vocab_from: str | None = None):
    """The transformers config of the named config ``name`` (`CONFIGS`). ``layers``: that many decoder layers instead
    (the same shapes, smaller); ``vocab_from``: a model directory whose vocabulary size and special token ids replace
    the named ones, so that its tokenizer drives a random model of the named shapes."""
    import transformers as tf

    spec = dict(CONFIGS[name])
    if layers is not None:
        spec["num_hidden_layers"] = layers
    if vocab_from is not None:
        real = tf.AutoConfig.from_pretrained(vocab_from)
        spec.update(vocab_size=real.vocab_size, bos_token_id=real.bos_token_id, eos_token_id=real.eos_token_id,
                    pad_token_id=real.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    return tf.AutoConfig.for_model(**spec)


def build_model(
    name: str,
    device: str,
    dtype: torch.dtype,
    gpus: int = 1,
    *,
    layers: int | None = None,
    vocab_from: str | None = None,
    fixed_length: bool = True,
):
    """A random-weight model from a named config (sharded layer-wise over ``gpus`` GPUs with accelerate; ``layers``
    and ``vocab_from`` as in `named_config`), or a local directory's weights. ``fixed_length`` (the bench's
    protocol): no end-of-sequence token, so that every generation runs to its length; False keeps the model's own
    (lm-eval's generations stop at it)."""
    import transformers as tf

    if name in CONFIGS:
        config = named_config(name, layers, vocab_from)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        if gpus > 1:
            model = sharded_random_model(config, dtype, gpus)
        else:
            with torch.device(device):
                model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        kwargs = dict(device_map="balanced") if gpus > 1 else {}
        model = tf.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", **kwargs)
        if gpus <= 1:
            model = model.to(device)
    model.eval()
    if fixed_length:
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return model


def layer_device_map(n_layers: int, gpus: int, prefix: str = "model") -> dict[str, int]:
    """Contiguous blocks of decoder layers per GPU (accelerate's device_map format); embeddings on the first GPU,
    final norm and LM head on the last."""
    per = -(-n_layers // gpus)
    device_map = {f"{prefix}.embed_tokens": 0, f"{prefix}.rotary_emb": 0}
    device_map.update({f"{prefix}.layers.{i}": i // per for i in range(n_layers)})
    device_map.update({f"{prefix}.norm": gpus - 1, "lm_head": gpus - 1})
    return device_map


def sharded_random_model(config, dtype, gpus: int):
    """Build on the meta device, materialise each part directly on its GPU with random weights, dispatch."""
    import transformers as tf
    from accelerate import dispatch_model

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    device_map = layer_device_map(config.num_hidden_layers, gpus)
    for name, dev in device_map.items():
        module = model.get_submodule(name)
        module.to_empty(device=f"cuda:{dev}")
        for pname, param in module.named_parameters():
            with torch.no_grad():
                param.fill_(1.0) if "norm" in pname else param.normal_(0.0, config.initializer_range)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config, device="cuda:0")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return dispatch_model(model, device_map=device_map, skip_keys=model._skip_keys_device_placement)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def allocated_gib(device: str) -> float | None:
    """Memory allocated now (weights, inputs), summed over all GPUs; None off CUDA (no allocator statistics)."""
    if not device.startswith("cuda"):
        return None
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30


def peak_gib(device: str) -> float | None:
    """Peak allocated memory, summed over all GPUs (a sharded model uses several); None off CUDA."""
    if not device.startswith("cuda"):
        return None
    return round(sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30, 2)


def gib_since(peak: float | None, before: float | None) -> float | None:
    """``peak - before`` in GiB, rounded; None when either is unknown (off CUDA)."""
    return None if peak is None or before is None else round(peak - before, 2)


def copy_bandwidth(device: str) -> float:
    """Measured memory bandwidth in bytes/s (bytes read + written by a large copy): the device's on CUDA, the
    host's on the CPU (256 MiB buffers there, far beyond any cache, and fewer repetitions: it is the denominator
    of a floor, not a figure of its own)."""
    on_cuda = device.startswith("cuda")
    n, repeats = (1 << 28, 20) if on_cuda else (1 << 27, 5)  # 512 MiB of bf16 on CUDA, 256 MiB on the CPU
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    sync(device)
    bw = 2 * a.numel() * a.element_size() * repeats / (time.perf_counter() - t)
    del a, b
    return bw


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize


def first_token(device: str):
    """A transformers stopping criterion that stops nothing: on its first call, when ``generate`` has produced the
    first new token, it records that time (after a device sync) in ``.at`` and the peak memory so far in
    ``.peak``, so that prefill and decode are timed within one ``generate`` call (see the module docstring).
    Built here, not at import: importing transformers' generation would slow ``squeezekit bench --help``."""
    from transformers import StoppingCriteria

    class FirstToken(StoppingCriteria):
        at: float | None = None  #: perf_counter when the first new token existed
        peak: float | None = None  #: peak GiB until then (None off CUDA)

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            if self.at is None:
                sync(device)
                self.at = time.perf_counter()
                self.peak = peak_gib(device)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return FirstToken()


@torch.inference_mode()
def quantized_cache(model, backend: str, bits: int | None):
    """transformers' own ``QuantizedCache`` for ``model`` (a `BaselineMissing` when the backend cannot run
    here: its package is not installed, or this transformers does not have it)."""
    from transformers import cache_utils

    cls = getattr(cache_utils, "QuantizedCache", None)
    if cls is None:
        raise BaselineMissing(f"transformers {transformers_version()} has no QuantizedCache")
    kwargs = {} if bits is None else {"nbits": bits}
    try:
        return cls(backend, model.config, **kwargs)
    except (ImportError, ValueError, TypeError, NotImplementedError) as exc:
        raise BaselineMissing(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None


class BaselineMissing(RuntimeError):
    """A baseline that cannot run here: a QuantizedCache backend whose package is missing, a serving path this
    transformers does not have (the bench reports it as not run, with this message)."""


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers cache's layers hold (quantized tensors, scales and residuals), as far as
    they are plain tensors or tuples of them."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def run_hf(model, ids: torch.Tensor, new_tokens: int, device: str, quantized: tuple | None = None) -> dict:
    """One greedy ``generate`` of ``new_tokens`` tokens with transformers' full cache (or, with ``quantized`` =
    (backend, bits), its QuantizedCache), prefill and decode timed within it (see the module docstring)."""
    cache = None if quantized is None else quantized_cache(model, *quantized)
    peak_reset(device)
    before = allocated_gib(device)
    r = timed_generate(model, ids, new_tokens, device, before, **({} if cache is None else {"past_key_values": cache}))
    B, L = ids.shape
    kv = B * L * kv_bytes_per_token(model) if cache is None else cache_bytes(cache)
    return {**r, "kv_bytes": kv, "kv_bytes_peak_prefill": kv}


def timed_generate(model, ids: torch.Tensor, new_tokens: int, device: str, before: float | None, **kwargs) -> dict:
    """One greedy ``model.generate(ids, **kwargs)`` of exactly ``new_tokens`` tokens, prefill and decode timed within
    it (see the module docstring): a run's figures but its KV bytes, and its new ``tokens``. ``before``: the GiB
    allocated when the run began (`allocated_gib`), which the prefill's memory is counted from."""
    from transformers import StoppingCriteriaList

    first = first_token(device)
    sync(device)
    t = time.perf_counter()
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([first]),
        **kwargs,
    )
    sync(device)
    end = time.perf_counter()
    assert first.at is not None, "generate produced no token"
    B, L = ids.shape
    assert out.shape[1] == L + new_tokens
    prefill, decode, total = first.at - t, end - first.at, end - t
    return dict(
        prefill_s=round(prefill, 3),
        total_s=round(total, 3),
        decode_tok_s=round(B * (new_tokens - 1) / decode, 1),
        e2e_tok_s=round(B * new_tokens / total, 1),
        step_ms=round(1000 * decode / (new_tokens - 1), 2),
        peak_gib=peak_gib(device),
        prefill_mem_gib=gib_since(first.peak, before),
        tokens=out[:, L:],
    )


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def model_name(model: str) -> str:
    """The name results are filed under: a named config as is, a model directory by its folder name."""
    if model in CONFIGS:
        return model
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).resolve().name)
    return name.strip("-.") or "model"
