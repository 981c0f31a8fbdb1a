"""Pieces every lorakern kernel shares: the dot helper, the dropout mask, launch settings.

Triton traps handled here once (DESIGN.md §4):
- the interpreter's `tl.dot` on bfloat16 multiplies raw bit patterns, so under
  TRITON_INTERPRET=1 operands are upcast to fp32 before the dot (UPCAST);
- the interpreter's fp32 -> bf16 cast truncates, so downcasts go through `cast`;
- the interpreter cannot time autotune candidates, so it gets exactly one config.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import settings

# Rank dimension of A / B / S is padded in registers to a power of two >= 16
# (tl.dot's minimum) and masked on load; never padded in memory.
MIN_RANK_PAD = 16


# Triton decides at decoration time (when this package is imported) whether its
# kernels run in the interpreter, so the switch is read once, here.
_INTERPRETING = settings.interpret


def interpreting() -> bool:
    return _INTERPRETING


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are ConstexprFunction
# objects costing ~2.6 µs a call on the host (Triton 3.6 and 3.9); a launch needs several.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def rank_pad(r: int) -> int:
    return max(MIN_RANK_PAD, next_pow2(r))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for fp32 operands, following torch's matmul precision setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


_META_TF32 = {"UPCAST": _INTERPRETING, "PRECISION": "tf32"}
_META_IEEE = {"UPCAST": _INTERPRETING, "PRECISION": "ieee"}


def common_meta(dtype: torch.dtype) -> dict:
    """Constexpr arguments shared by every kernel launch (a shared dict: callers unpack it)."""
    return _META_IEEE if dot_precision(dtype) == "ieee" else _META_TF32


def check_device(name: str, t: torch.Tensor) -> None:
    if t.is_cuda:
        return
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{name} is on {t.device}; the Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1)"
        )


class DeviceScalars(NamedTuple):
    """scaling, dropout p, 1/(1-p) and the seed in device memory, for launches the host
    must not read them for (torch.compile's traced `triton_op` path: the values are graph
    tensors, so changing them neither syncs nor recompiles). A launcher given one as its
    `scaling` / `p` / `seed` passes pointers, and the kernels load the values.

    values: float32 [3] (s, p, 1/(1-p)), p stored as -1 when it is 0 (keeps every
    element); seed: int64 [1]; has_dropout: whether the kernels apply the mask (static).
    """

    values: torch.Tensor
    seed: torch.Tensor
    has_dropout: bool


def to_device_scalars(scaling: float, p: float, seed: int, device) -> DeviceScalars:
    """Host values -> a DeviceScalars on `device` (rounded to fp32 as by-value arguments are)."""
    values = torch.tensor([scaling, p if p > 0.0 else -1.0, 1.0 / (1.0 - p)], dtype=torch.float32)
    seed_t = torch.tensor([seed], dtype=torch.int64)
    return DeviceScalars(values.to(device, non_blocking=True), seed_t.to(device, non_blocking=True), p > 0.0)


def traced(t: torch.Tensor) -> bool:
    """True for a FakeTensor, bare or inside a FunctionalTensor: torch.compile (or export)
    tracing a triton_op body, where launches must become graph nodes."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):  # eager: the fast answer
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def wrap_triton(kernel, like: torch.Tensor):
    """`kernel`, or `torch.library.wrap_triton(kernel)` while torch.compile traces (FakeTensor
    inputs): the launch then becomes a graph node instead of running. Only then: a
    wrapped launch outside tracing goes through the dispatcher (~1 ms).

    Named after torch's on purpose, and called with the kernel's own name (or a local
    assigned from those names): torch finds a triton_op's kernels for its compile-cache
    key by reading the source for `wrap_triton(<name>)` calls (torch._library.triton.
    get_inner_triton_kernels), so a changed kernel invalidates cached compiled graphs.
    """
    if traced(like):
        from torch.library import wrap_triton as torch_wrap_triton

        return torch_wrap_triton(kernel)
    return kernel


def has_dropout(p) -> bool:
    """Whether the mask applies: p > 0 by value, or DeviceScalars.has_dropout."""
    return p.has_dropout if isinstance(p, DeviceScalars) else p > 0.0


def scalar_args(p, seed, scaling=None) -> dict:
    """The kernels' p, inv_keep, seed, HAS_DROPOUT, SCALARS_IN_MEMORY (and scaling, unless
    None: a kernel without one) arguments.

    By value: float p and scaling, int seed. In memory: one DeviceScalars passed as p and
    seed (and scaling), or as scaling alone with p=0.0 (a launch without dropout).
    """
    mem = next((v for v in (scaling, p, seed) if isinstance(v, DeviceScalars)), None)
    if mem is None:
        args = {"p": p, "inv_keep": 1.0 / (1.0 - p), "seed": seed, "HAS_DROPOUT": p > 0.0, "SCALARS_IN_MEMORY": False}
    elif p is mem and seed is mem and scaling in (None, mem):
        args = {"p": mem.values, "inv_keep": 0.0, "seed": mem.seed, "HAS_DROPOUT": mem.has_dropout, "SCALARS_IN_MEMORY": True}
    elif scaling is mem and not isinstance(p, DeviceScalars) and p == 0.0 and not isinstance(seed, DeviceScalars):
        args = {"p": 0.0, "inv_keep": 1.0, "seed": 0, "HAS_DROPOUT": False, "SCALARS_IN_MEMORY": True}
    else:
        raise TypeError("DeviceScalars: pass one object as p, seed (and scaling), or as scaling with p=0.0")
    if scaling is not None:
        args["scaling"] = mem.values if mem is not None else scaling
    return args


@triton.jit
def load_scaling(scaling, SCALARS_IN_MEMORY: tl.constexpr):
    """s passed by value, or loaded from DeviceScalars.values[0]."""
    if SCALARS_IN_MEMORY:
        return tl.load(scaling)
    else:
        return scaling


@triton.jit
def load_dropout(p, inv_keep, seed, SCALARS_IN_MEMORY: tl.constexpr):
    """(p, 1/(1-p), seed) passed by value, or loaded: p then points at DeviceScalars.values
    and seed at DeviceScalars.seed."""
    if SCALARS_IN_MEMORY:
        return tl.load(p + 1), tl.load(p + 2), tl.load(seed)
    else:
        return p, inv_keep, seed


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; a, b already in the compute dtype."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even on every backend.

    The interpreter's fp32 -> bf16 conversion truncates (checked on Triton 3.9), while
    GPUs round to nearest even; under UPCAST the rounding is done here with integer ops
    so interpreted results match what the GPU computes.
    """
    if UPCAST:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def keep_mask(seed, rows, k0, n_cols, p, BLOCK_K: tl.constexpr):
    """Inverted-dropout keep mask for the tile rows x [k0, k0 + BLOCK_K) of a [*, n_cols]
    tensor (k0 a multiple of 4). One Philox call gives four uniforms: element (i, j)
    takes lane j % 4 of the call at counter i * ceil(n_cols / 4) + j // 4, and is kept
    when that uniform is > p. `lorakern.reference.dropout_keep_mask` is the same map.
    rows: int64 [BLOCK_M]."""
    groups = (n_cols + 3) // 4
    g = k0 // 4 + tl.arange(0, BLOCK_K // 4).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * groups + g[None, :])
    # tl.join adds a new minor dim: lanes[..., i, j] = lane 2i + j, so the row-major
    # reshape to [BLOCK_M, BLOCK_K] puts lane L of group g at column 4g + L.
    lanes = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    u = tl.reshape(lanes, (rows.shape[0], BLOCK_K))
    # tl.rand's uint32 -> [0, 1) map.
    i = u.to(tl.int32, bitcast=True)
    i = tl.where(i < 0, ~i, i)
    return i.to(tl.float32) * 4.6566127342e-10 > p


@triton.jit
def drop(x, keep):
    """x with the dropped elements zeroed as torch's dropout does (x * 0): a finite x
    becomes exactly ±0, an Inf or NaN becomes NaN (it propagates, as in PyTorch). A
    where, not a multiply by keep.to(x.dtype): x keeps its dtype, and the interpreter
    cannot cast a bool block to bfloat16."""
    return tl.where(keep, x, x * 0.0)
