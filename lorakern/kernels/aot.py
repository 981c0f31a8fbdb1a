"""Compile every lorakern kernel ahead of time for a GPU target — no GPU needed.

Triton can lower a kernel to PTX and a cubin (through the ptxas it ships) for any
NVIDIA architecture on a machine without a GPU. That catches what the interpreter
cannot: type errors of the real compiler, unsupported ops, and tiles whose shared
memory exceeds the chip's limit. Run it with TRITON_INTERPRET unset:

    python -m lorakern.kernels.aot            # quick (~30 s): each kernel once per dtype,
                                              # GEMMs at SINGLE_TILE, sm_90
    python -m lorakern.kernels.aot --all      # every GEMM tile, r_pad 16 and 64 (~8 min)

With --all, some fp32 one-pass tiles exceed shared memory: expected, the autotuner
skips them; the quick run must pass entirely (tests/test_kernels_aot.py).

It does not run anything: numerical correctness on a GPU is the CUDA tests' job.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import backward, dequant, forward, merge, qgemm, sgmv, shrink, tma
from .common import dot_precision

# Hopper: 227 KiB of shared memory per block at most.
MAX_SHARED = {90: 232448, 80: 166912}
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# Pointer arguments by role: activations and base weights in the compute dtype,
# adapters in theirs, S / dS and the partial buffers in fp32.
_COMPUTE_PTRS = {"x_ptr", "w_ptr", "bias_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
_ADAPTER_PTRS = {"a_ptr", "b_ptr"}
_FLOAT_ARGS = {"p", "inv_keep", "scaling"}


def _jit_fn(kernel):
    # An Autotuner wraps the JITFunction (whose own .fn is the plain Python function).
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def _signature(fn, dtype, adapter_dtype, constexprs: dict) -> dict[str, str]:
    sig = {}
    in_memory = constexprs.get("SCALARS_IN_MEMORY", False)
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif in_memory and name in ("scaling", "p"):
            sig[name] = "*fp32"  # DeviceScalars.values
        elif in_memory and name == "seed":
            sig[name] = "*i64"
        elif name in _COMPUTE_PTRS:
            sig[name] = _PTR[dtype]
        elif name in _ADAPTER_PTRS:
            sig[name] = _PTR[adapter_dtype]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "seed":
            sig[name] = "i64"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _blocks(cfg: dict) -> dict:
    """A launcher's config without num_warps: the kernel's constexpr block sizes."""
    return {k: v for k, v in cfg.items() if k != "num_warps"}


def _cases(dtype: torch.dtype, adapter_dtype: torch.dtype, r_pad: int, all_tiles: bool, in_memory: bool = False):
    """(label, kernel, constexprs, num_warps, num_stages) for one dtype pair; in_memory:
    scalars loaded from DeviceScalars (the traced triton_op path)."""
    common = {"UPCAST": False, "PRECISION": dot_precision(dtype), "R_PAD": r_pad, "SCALARS_IN_MEMORY": in_memory}
    # Launch settings come from the launchers' own config functions (one source), at
    # Llama-sized arguments; the dS/dB pass's row block depends on r and dY's dtype.
    cfg = shrink._config(4096)
    yield "shrink", shrink._lora_shrink_kernel, {**common, **_blocks(cfg), "HAS_DROPOUT": True}, cfg["num_warps"], 3
    dsdb = {tuple(c.items()): c for c in (backward._dsdb_config(8192, r, 2) for r in (16, 64, 128))}
    # Its 2-D grid ("split") at M = 8192 and 2048: row blocks of 256 and 128, today the same
    # blocks as the 1-D grid's at r = 128 and 64 (then compiled once each). SPLIT_N is a grid
    # size, not a constexpr: one compile covers every split.
    for M in (8192, 2048):
        cfg = {k: v for k, v in backward._dsdb_split_config(M, 4096, 16, 2).items() if k != "SPLIT_N"}
        dsdb[tuple(cfg.items())] = cfg
    for cfg in dsdb.values():
        yield (f"dsdb {cfg['BLOCK_M']}x{cfg['BLOCK_N']}", backward._lora_bwd_dsdb_kernel, {**common, **_blocks(cfg)},
               cfg["num_warps"], 3)
    cfg = backward._da_config()
    # dS as one [M, r] tensor (DS_SPLIT 1) or as the split dS/dB pass's partials, summed on load.
    for ds_split in (1, backward._MAX_SPLIT_N):
        yield (f"dA{'' if ds_split == 1 else f' dS x{ds_split}'}", backward._lora_bwd_da_kernel,
               {**common, **_blocks(cfg), "HAS_DROPOUT": True, "DS_SPLIT": ds_split}, cfg["num_warps"], 3)
    tile = merge.MERGE_TILE  # W + s·B A for the merged-weight variant (dropout 0)
    yield "merge", merge._lora_merge_kernel, {**common, "BLOCK_N": tile["BLOCK_N"], "BLOCK_K": tile["BLOCK_K"]}, tile["num_warps"], 3
    tiles = forward.GEMM_TILES if all_tiles else [forward.SINGLE_TILE]
    for (bm, bc, br, warps, stages), fuse in itertools.product(tiles, (False, True)):
        yield (
            f"fwd {bm}x{bc}x{br}{' onepass' if fuse else ''}",
            forward._lora_fwd_kernel,
            {**common, "BLOCK_M": bm, "BLOCK_N": bc, "BLOCK_K": br, "GROUP_M": 8, "HAS_BIAS": True,
             "FUSE_SHRINK": fuse, "HAS_DROPOUT": fuse, "HAS_BASE": True, "STORE_S": fuse},
            warps, stages,
        )
    if dtype != torch.float32:  # the persistent TMA forward: fp16 / bf16 only (fp32 exceeds shared memory)
        bm, bn, bk, warps, stages, subtile = tma.HOPPER_TILE
        yield (f"fwd tma {bm}x{bn}x{bk}", tma._lora_fwd_tma_kernel,
               {**common, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": tma.GROUP_M, "NUM_SMS": 132,
                "EPILOGUE_SUBTILE": subtile, "HAS_BIAS": True}, warps, stages)
    # The accumulate variant (cuBLAS wrote x Wᵀ + bias; forward.lora_forward_unfused's tile).
    cfg = forward.accumulate_config("BLOCK_N", "BLOCK_K")
    yield (
        f"fwd {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} add", forward._lora_fwd_kernel,
        {**common, **_blocks(cfg), "HAS_BIAS": False, "FUSE_SHRINK": False, "HAS_DROPOUT": False, "HAS_BASE": False,
         "STORE_S": False},
        cfg["num_warps"], 3,
    )
    # The small-M accumulate variant that also computes S (lora_forward_onepass, cublas_base=True).
    tile = forward._SMALL_M_ACCUMULATE
    yield (
        "fwd 16x128x128 onepass add", forward._lora_fwd_kernel,
        {**common, "BLOCK_M": tile["BLOCK_M"], "BLOCK_N": tile["BLOCK_N"], "BLOCK_K": tile["BLOCK_K"], "GROUP_M": 8,
         "HAS_BIAS": False, "FUSE_SHRINK": True, "HAS_DROPOUT": True, "HAS_BASE": False, "STORE_S": True},
        tile["num_warps"], 3,
    )
    # Inference (need_S=False): the one-pass kernel without S's store.
    bm, bc, br, warps, stages = forward.SINGLE_TILE
    yield (
        f"fwd {bm}x{bc}x{br} onepass no-S", forward._lora_fwd_kernel,
        {**common, "BLOCK_M": bm, "BLOCK_N": bc, "BLOCK_K": br, "GROUP_M": 8, "HAS_BIAS": True,
         "FUSE_SHRINK": True, "HAS_DROPOUT": False, "HAS_BASE": True, "STORE_S": False},
        warps, stages,
    )
    # dS summed from partials on load (DS_SPLIT > 1): the epilogue only, so at one tile.
    ds_splits = [(tile, 1) for tile in tiles] + [(forward.SINGLE_TILE, backward._MAX_SPLIT_N)]
    for ((bm, bc, br, warps, stages), ds_split), has_base in itertools.product(ds_splits, (True, False)):
        yield (
            f"dx {bm}x{bc}x{br}{'' if has_base else ' add'}{'' if ds_split == 1 else f' dS x{ds_split}'}",
            backward._lora_bwd_dx_kernel,
            {**common, "BLOCK_M": bm, "BLOCK_K": bc, "BLOCK_N": br, "GROUP_M": 8, "HAS_BASE": has_base,
             "HAS_DROPOUT": True, "DS_SPLIT": ds_split},
            warps, stages,
        )


def _dequant_cases():
    """(label, kernel, signature, constexprs, options) of the dequantisation kernels, per
    output dtype (their pointer types are not the GEMMs' roles, so spelled out here)."""
    for dtype in _PTR:
        out = _PTR[dtype]
        dt = str(dtype)[6:]
        cfg = {k: v for k, v in dequant._config_4bit().items() if k != "num_warps"}
        for double_quant in (False, True):
            sig = {"data_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8" if double_quant else "*fp32",
                   "offset_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
                   "out_ptr": out, "numel": "i64", "n_bytes": "i64"}
            constexprs = {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "DOUBLE_QUANT": double_quant, "UPCAST": False, **cfg}
            yield (f"dequant 4bit{' dq' if double_quant else ''} out={dt}", dequant._lora_dequant_4bit_kernel,
                   {**sig, **dict.fromkeys(constexprs, "constexpr")}, constexprs,
                   {"num_warps": dequant._config_4bit()["num_warps"], "enable_fp_fusion": False})
        cfg = {k: v for k, v in dequant._config_int8().items() if k != "num_warps"}
        sig = {"data_ptr": "*i8", "absmax_ptr": "*fp32", "out_ptr": out, "N": "i32", "K": "i32",
               "stride_dn": "i32", "stride_dk": "i32"}
        constexprs = {"UPCAST": False, **cfg}
        yield (f"dequant int8 out={dt}", dequant._lora_dequant_int8_kernel,
               {**sig, **dict.fromkeys(constexprs, "constexpr")}, constexprs,
               {"num_warps": dequant._config_int8()["num_warps"]})


def _qgemm_cases(all_tiles: bool):
    """(label, kernel, signature, constexprs, options) of the fused dequantise-GEMM
    (kernels/qgemm.py): each format per x dtype at the first tile (every tile with
    --all), plus its other paths (odd K, blocks straddling rows, blocksize >= BLOCK_K,
    split-K partials) once in bf16."""
    tiles = qgemm.QGEMM_TILES if all_tiles else qgemm.QGEMM_TILES[:1]
    formats = {  # label: (data, absmax, INT8, DOUBLE_QUANT)
        "nf4": ("*u8", "*fp32", False, False), "nf4 dq": ("*u8", "*u8", False, True), "int8": ("*i8", "*fp32", True, False),
    }
    # label: EVEN_K, ROW_ALIGNED, BLOCKSIZE, PARTIAL
    paths = {"": (True, True, 64, False)}
    extra = {" oddK": (False, False, 64, False), " bs256": (True, True, 256, False), " split": (True, True, 64, True)}
    for dtype, (bn, bk, warps, stages), (fmt, (data, absmax, int8, dq)) in itertools.product(_PTR, tiles, formats.items()):
        for path, (even_k, row_aligned, blocksize, partial) in [*paths.items(), *(extra.items() if dtype == torch.bfloat16 else ())]:
            if int8 and path in (" oddK", " bs256"):
                continue
            sig = {"x_ptr": _PTR[dtype], "data_ptr": data, "absmax_ptr": absmax, "code_ptr": "*fp32", "offset_ptr": "*fp32",
                   "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "bias_ptr": _PTR[dtype],
                   "y_ptr": "*fp32" if partial else _PTR[dtype]}
            sig.update(dict.fromkeys(("M", "N", "K", "K_BYTES", "K_PER_SPLIT", "stride_xm", "stride_xk", "stride_dn", "stride_dk",
                                      "stride_ys", "stride_ym", "stride_yn", "stride_bias"), "i32"))
            constexprs = {"BLOCK_M": qgemm.BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk, "INT8": int8,
                          "BLOCKSIZE": 1 if int8 else blocksize, "NESTED_BLOCKSIZE": 256 if dq else 1, "DOUBLE_QUANT": dq,
                          "EVEN_K": even_k, "ROW_ALIGNED": row_aligned and not int8, "HAS_BIAS": not partial,
                          "PARTIAL": partial, "UPCAST": False, "PRECISION": dot_precision(dtype)}
            yield (f"qgemm {fmt}{path} 16x{bn}x{bk} x={str(dtype)[6:]}", qgemm._lora_qgemm_kernel,
                   {**sig, **dict.fromkeys(constexprs, "constexpr")}, constexprs,
                   {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False})


def _sgmv_cases():
    """(label, kernel, signature, constexprs, options) of the mixed-batch kernels
    (kernels/sgmv.py) at their launch settings: bf16 activations with fp32 adapters at
    rank pad 16 and 64, with and without dropout, both row blocks; the other dtype pairs
    once (rank pad 16, dropout, 16-row blocks)."""
    seg = {"order_ptr": "*i64", "start_ptr": "*i64", "count_ptr": "*i64", "scale_ptr": "*fp32", "p_ptr": "*fp32", "seed": "i64"}
    block_ms = sorted({sgmv._block_m(M) for M in (16, 4096)})  # decode and prefill segments
    runs = [((torch.bfloat16, torch.float32), r_pad, dropout, block_ms) for r_pad in (16, 64) for dropout in (False, True)]
    runs += [(pair, 16, True, block_ms[:1]) for pair in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                  (torch.float32, torch.float32))]
    for (dtype, adt), r_pad, dropout, block_ms in runs:
        meta = {"UPCAST": False, "PRECISION": dot_precision(dtype), "HAS_DROPOUT": dropout}
        label = f"x={str(dtype)[6:]} A={str(adt)[6:]} r_pad={r_pad}{' p' if dropout else ''}"
        for block_m in block_ms:
            consts = {**meta, "BLOCK_M": block_m, "BLOCK_K": 128, "R_PAD": r_pad}
            sig = {"x_ptr": _PTR[dtype], "w_ptr": _PTR[adt], "out_ptr": "*fp32", **seg}
            sig.update(dict.fromkeys(("K", "R", "stride_xm", "stride_xk", "stride_wa", "stride_wr", "stride_wk",
                                      "stride_om", "stride_or"), "i32"))
            yield (f"sgmv shrink m{block_m} {label}", sgmv._sgmv_shrink_kernel,
                   {**sig, **dict.fromkeys(consts, "constexpr")}, consts, {"num_warps": 4})
            consts = {**meta, "BLOCK_M": block_m, "BLOCK_N": 128, "R_PAD": r_pad}
            sig = {"out_ptr": _PTR[dtype], "s_ptr": "*fp32", "w_ptr": _PTR[adt], **seg}
            sig.update(dict.fromkeys(("N", "R", "stride_om", "stride_on", "stride_sm", "stride_sr", "stride_wa",
                                      "stride_wn", "stride_wr"), "i32"))
            yield (f"sgmv expand m{block_m} {label}", sgmv._sgmv_expand_kernel,
                   {**sig, **dict.fromkeys(consts, "constexpr")}, consts, {"num_warps": 4})
        for grad, (left, right, bp, bq) in {"dB": (_PTR[dtype], "*fp32", 64, r_pad), "dA": ("*fp32", _PTR[dtype], r_pad, 64)}.items():
            consts = {**meta, "BLOCK_M": 32, "BLOCK_P": bp, "BLOCK_Q": bq}
            sig = {"l_ptr": left, "r_ptr": right, "out_ptr": "*fp32", **seg}
            sig.update(dict.fromkeys(("P", "Q", "stride_lm", "stride_lp", "stride_rm", "stride_rq", "stride_oa",
                                      "stride_op", "stride_oq"), "i32"))
            yield (f"sgmv grad {grad} {label}", sgmv._sgmv_grad_kernel,
                   {**sig, **dict.fromkeys(consts, "constexpr")}, consts, {"num_warps": 4})


def _sum_cases():
    """(label, kernel, signature, constexprs, options) of the backward's partial-sum kernel
    (backward.sum_partials) per output dtype of dA / dB (the adapters' dtype)."""
    for dtype in _PTR:
        sig = {"a_ptr": "*fp32", "out_a_ptr": _PTR[dtype], "P_A": "i32", "NUMEL_A": "i32",
               "b_ptr": "*fp32", "out_b_ptr": _PTR[dtype], "P_B": "i32", "NUMEL_B": "i32",
               "BLOCK": "constexpr", "UPCAST": "constexpr"}
        yield (f"sum partials out={str(dtype)[6:]}", backward._sum_partials_kernel, sig,
               {"BLOCK": backward.SUM_BLOCK, "UPCAST": False}, {"num_warps": 4})


def _compile_one(name, fn, signature, constexprs, options, target, arch, print_fn) -> dict:
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=target, options=options)
        shared = int(compiled.metadata.shared)
        ok = shared <= MAX_SHARED.get(arch, MAX_SHARED[90])
        error = None if ok else f"shared memory {shared} B > {MAX_SHARED.get(arch, MAX_SHARED[90])} B"
    except Exception as exc:  # a compile failure is the finding
        shared, ok, error = None, False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print_fn(f"{'ok  ' if ok else 'FAIL'} sm_{arch} {name:<52} shared {shared} B  {time.perf_counter() - t0:.1f}s"
             + (f"  {error}" if error else ""))
    return {"case": name, "ok": ok, "shared": shared, "error": error}


def compile_all(arch: int = 90, all_tiles: bool = False, print_fn=print) -> list[dict]:
    """Compile each case for sm_<arch>; returns one dict per case (ok, shared bytes, error)."""
    target = GPUTarget("cuda", arch, 32)
    pairs = [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float32)]
    results = []
    # Scalars in device memory: one dtype pair is enough (only the scalar loads differ).
    runs = [(pair, r_pad, False) for pair, r_pad in itertools.product(pairs, (16, 64) if all_tiles else (16,))]
    runs.append((pairs[0], 16, True))
    for (dtype, adapter_dtype), r_pad, in_memory in runs:
        for label, kernel, constexprs, warps, stages in _cases(dtype, adapter_dtype, r_pad, all_tiles, in_memory):
            fn = _jit_fn(kernel)
            name = f"{label} x={str(dtype)[6:]} A={str(adapter_dtype)[6:]} r_pad={r_pad}{' mem' if in_memory else ''}"
            signature = _signature(fn, dtype, adapter_dtype, constexprs)
            options = {"num_warps": warps, "num_stages": stages}
            results.append(_compile_one(name, fn, signature, constexprs, options, target, arch, print_fn))
    for name, kernel, signature, constexprs, options in _dequant_cases():
        results.append(_compile_one(name, _jit_fn(kernel), signature, constexprs, options, target, arch, print_fn))
    for name, kernel, signature, constexprs, options in _qgemm_cases(all_tiles):
        results.append(_compile_one(name, _jit_fn(kernel), signature, constexprs, options, target, arch, print_fn))
    for name, kernel, signature, constexprs, options in (*_sgmv_cases(), *_sum_cases()):
        results.append(_compile_one(name, _jit_fn(kernel), signature, constexprs, options, target, arch, print_fn))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    parser.add_argument("--all", action="store_true", help="every GEMM tile, r_pad 16 and 64")
    args = parser.parse_args(argv)
    results = compile_all(args.arch, args.all)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} compiled, {len(failed)} failed (too big or broken)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
