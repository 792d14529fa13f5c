"""Compile squeezekit's Triton kernels for sm_90 without a GPU (run by tests/test_kernels.py in its own process).

Exit 0: every configuration compiled and fits in shared memory; 3: this Triton cannot compile ahead of time (skip).
"""

from __future__ import annotations

import inspect
import itertools
import sys


def _hopper_compile(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int, **options) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    floats = ("scale_log2", "Fill", "scale")
    sig = {
        n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
        for n in inspect.signature(fn).parameters
    }
    compiled = triton.compile(
        ASTSource(JITFunction(fn), sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, **options},
    )  # fmt: skip
    return compiled.metadata.shared


def main() -> int:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(f"this Triton has no ahead-of-time API: {exc}")
        return 3
    from squeezekit.kernels import attention as ka
    from squeezekit.kernels import decode as kd
    from squeezekit.kernels import evict as ke
    from squeezekit.kernels import importance as ki
    from squeezekit.kernels import steady as ks
    from squeezekit.kernels import window as kw

    ka._import_triton()
    kd._kernels()
    ks._kernel()
    ke._kernel()
    ki._kernel()
    kw._kernel()
    limit = 227 * 1024
    n = 0

    def check(fn, ptrs, consts, warps, stages, **options):
        nonlocal n
        smem = _hopper_compile(fn, ptrs, consts, warps, stages, **options)
        assert smem <= limit, (fn.__name__, consts, smem)
        n += 1

    attn = {"KVValid": "*i8", "KVPos": "*i32", "QPos": "*i32", "QValid": "*i8", "Lse": "*fp32", "Sums": "*fp32"}
    fp32 = ka.FP32_LAUNCH
    wide = ka.FP32_LAUNCH_WIDE
    for dt, prec, d, fwd, colsum in (
        ("bf16", "tf32", 128, ka._configs("fwd"), ka._configs("colsum")),
        ("bf16", "tf32", 256, ka._configs("fwd", True), ka._configs("colsum", True)),
        ("fp32", "ieee", 128, [(fp32["BLOCK_M"], fp32["BLOCK_N"], fp32["num_warps"], fp32["num_stages"])], None),
        ("fp32", "ieee", 256, [(wide["BLOCK_M"], wide["BLOCK_N"], wide["num_warps"], wide["num_stages"])], None),
    ):
        ptrs = {**attn, **{name: f"*{dt}" for name in ("Q", "K", "V", "Out")}}
        for c in fwd:
            m, nn, w, s = (
                (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) if hasattr(c, "kwargs") else c
            )
            check(
                ka._fwd,
                ptrs,
                dict(HAS_WINDOW=True, CAUSAL_SLOTS=True, DOT_PREC=prec, BLOCK_M=m, BLOCK_N=nn, BLOCK_D=d),
                w,
                s,
            )
        for c in colsum or [fwd[0]]:
            m, nn, w, s = (
                (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) if hasattr(c, "kwargs") else c
            )
            consts = dict(HAS_WINDOW=False, CAUSAL_SLOTS=True, DOT_PREC=prec, BLOCK_M=m, BLOCK_N=nn, BLOCK_D=d)
            check(ka._colsum, ptrs, consts, w, s)
    kv = {
        "Score": "*fp32",
        "Valid": "*i8",
        "Pos": "*i32",
        "Stat": "*fp32",
        "NewPos": "*i64",
        "Victim": "*i64",
        "NanFlag": "*u8",
        "Offsets": "*i64",
    }
    kv.update({name: "*bf16" for name in ("KNew", "VNew")})
    kv.update({name: "*fp16" for name in ("KScale", "KLow", "VScale", "VLow")})
    # the steady write into buffers or a pool's rows, in the model's dtype, 8 bits, 4 bits in two groups and in one
    writes = ((16, "*bf16", 128, 128), (8, "*i8", 128, 128), (4, "*u8", 64, 128), (4, "*u8", 64, 64))
    for bits, code, group, d in writes:
        for pooled in (False, True):
            consts = dict(HAS_STAT=True, POOLED=pooled, HOLES=not pooled, QBITS=bits, GROUP=group, BLOCK_S=1024,
                          BLOCK_D=d, BLOCK_GR=max(2, d // group))  # fmt: skip
            check(ks._steady_write, {**kv, "KCodes": code, "VCodes": code}, consts, 4, 3, enable_fp_fusion=False)
    ranked = {"Score": "*fp32", "Pos": "*i32", "Valid": "*i8", "Keep": "*i64", "Kept": "*i8", "NanFlag": "*u8"}
    for block in (16, 2048, ke.MAX_SLOTS):
        check(ke._drop_lowest, ranked, dict(BLOCK=block), 4 if block <= 1024 else 8, 3)
    for dt in ("bf16", "fp16", "fp32"):
        consts = dict(BF16=dt == "bf16", BLOCK=ki.BLOCK)
        check(ki._cosine_rows, {"X": f"*{dt}", "Out": f"*{dt}", "Cos": "*fp32"}, consts, 4, 3)
    for dt, rows, d in (("bf16", 32, 128), ("bf16", 128, 128), ("fp16", 32, 64), ("fp32", 32, 256), ("bf16", 128, 256)):
        window = {"Allow": "*u8", "Pos": "*i32", "QPos": "*i64", "Out": "*fp32", "M": "*fp32", "L": "*fp32"}
        window.update({name: f"*{dt}" for name in ("Q", "K", "V")})
        consts = dict(BLOCK_R=rows, BLOCK_S=kw.block_s(d), BLOCK_D=d, NATIVE_QK=dt != "fp32")
        check(kw._window_rows, window, consts, 4, 3)
    parts = {
        "PartAcc": "*fp32",
        "PartM": "*fp32",
        "PartL": "*fp32",
        "Offsets": "*i64",
        "Valid": "*i8",
        "Lengths": "*i32",
        **{name: "*fp16" for name in ("KScale", "KLow", "VScale", "VLow")},
        **{name: "*bf16" for name in ("Q", "K", "V", "Out")},
    }
    for one in (True, False):
        for pooled in (False, True):
            consts = dict(ONE_SPLIT=one, POOLED=pooled, DOT_PREC="tf32", BLOCK_G=16, BLOCK_N=64, BLOCK_D=128,
                          QBITS=16, GROUP=1, SLOTS_M=False, FP16_CODES=False)  # fmt: skip
            check(kd._split, parts, consts, 4, 3)
    for pooled in (False, True):
        consts = dict(ONE_SPLIT=True, POOLED=pooled, DOT_PREC="tf32", BLOCK_G=16, BLOCK_N=32, BLOCK_D=256,
                      QBITS=16, GROUP=1, SLOTS_M=False, FP16_CODES=False)  # fmt: skip
        check(kd._split, parts, consts, 4, 3)
    # quantized slots, read as rows: 8 bits; 4 bits in two groups (D = 128) and in one (D = 64)
    # in both orientations of the dots (SLOTS_M: the slots on their M axis)
    reads = ((8, "*i8", 1, 128), (4, "*u8", 64, 128), (4, "*u8", 1 << 30, 64), (16, "*bf16", 1, 128))
    for bits, code, group, d in reads:
        codes16 = (False, True) if bits < 16 else (False,)  # FP16_CODES: quantized slots only
        for one, slots_m, fp16 in itertools.product((True, False), (False, True), codes16):
            consts = dict(ONE_SPLIT=one, POOLED=True, DOT_PREC="tf32", BLOCK_G=16, BLOCK_N=64, BLOCK_D=d,
                          QBITS=bits, GROUP=group, SLOTS_M=slots_m, FP16_CODES=fp16)  # fmt: skip
            check(kd._split, {**parts, "K": code, "V": code}, consts, 4, 3)
    check(kd._merge, parts, dict(BLOCK_D=128, BLOCK_G=16), 4, 1)
    print(f"compiled {n} kernel configurations for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
