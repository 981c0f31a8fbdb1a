"""The core every route of the LoRA linear calls: checks, scalars, autocast, the math.

    y = x Wᵀ + s · (D(x) Aᵀ) Bᵀ + bias

`lorakern.ops.lora_linear` reaches this math four ways (the no-autograd forward,
`LoraLinearFunction`, the opaque custom ops, and `lorakern.triton_ops` under
torch.compile); the quantized (`qops`) and mixed-batch (`mixed_ops`) ops reuse it too.
Each of them calls what is here, so the rules live in one place:
- inputs: `check_devices`, then `check_inputs` (shapes, dtypes, scalar *types*: no
  value is read, so it runs while torch.compile traces);
- scalars: `scalar_values` turns scaling / dropout_p / seed (Python numbers or
  one-element CPU tensors) into validated Python numbers with the seed resolved (drawn
  from torch's CPU generator when dropout is on and none is given) — eagerly at the
  entry, inside the registered ops' bodies when traced; `scalar_tensors` turns them
  into the tensors the registered ops take;
- autocast: `autocast_inputs` casts like F.linear at the entry, `autocast_off` (a
  context) / `without_autocast` (a call) keep it out of the op bodies;
- math: `forward_core` / `backward_core` on the chosen backend (`implementation`),
  `base_grads` (dW, dbias), `op_grads` (the five gradients of a registered op) and
  `bwd_outputs` (a gradient not computed travels as an empty [0] tensor).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from types import ModuleType

import torch

from lorakern import reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 runs on the reference backend only (for gradcheck and as an fp64 oracle).
REFERENCE_ONLY_DTYPES = (torch.float64,)
_ACCEPTED_DTYPES = SUPPORTED_DTYPES + REFERENCE_ONLY_DTYPES


def check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed=None) -> None:
    """Raise TypeError / ValueError naming the offending shapes or dtypes (devices are
    `check_devices`', which runs first: autocast asks x's device type before this).
    Scalars: their types, and the values of Python numbers; a tensor's value is read
    by `scalar_values` (not while torch.compile traces)."""
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B, "bias": bias}
    for name, t in named.items():
        if t is None and name in ("bias", "weight"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _ACCEPTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; lorakern supports float32, float16 and bfloat16 "
                "(and float64 on the reference backend)"
            )
    if weight is not None and weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")
    for name in ("lora_A", "lora_B"):
        if named[name].dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{name} dtype {named[name].dtype} must be x's dtype {x.dtype} or float32"
            )
    if weight is None:
        # The LoRA term alone: N from lora_B, K from lora_A (checked below).
        if bias is not None:
            raise ValueError("bias needs a weight: with weight=None only the LoRA term is computed")
        if x.dim() < 1 or lora_A.dim() != 2 or lora_B.dim() != 2:
            raise ValueError(f"expected x [..., K], lora_A [r, K], lora_B [N, r], got x {tuple(x.shape)}, "
                             f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
        n, k = lora_B.shape[0], x.shape[-1]
    else:
        if weight.dim() != 2 or x.dim() < 1:
            raise ValueError(f"expected x [..., K] and weight [N, K], got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
        n, k = weight.shape
        if x.shape[-1] != k:
            raise ValueError(f"x's last dim {x.shape[-1]} != weight's in_features {k} (x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[0] < 1 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must be [r, {k}] with r >= 1, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (n, r):
        against = "" if weight is None else f"weight {tuple(weight.shape)} and "
        raise ValueError(
            f"lora_B must be [{n}, {r}] to match {against}lora_A {tuple(lora_A.shape)}, got {tuple(lora_B.shape)}"
        )
    _check_scalar("scaling", scaling, x.device)
    _check_scalar("dropout_p", dropout_p, x.device)
    _check_seed(seed)
    if not isinstance(dropout_p, torch.Tensor):
        check_dropout_value(dropout_p)


def check_devices(x, weight, bias, lora_A, lora_B) -> None:
    """All tensors on x's device (checked before autocast, which asks x's device type)."""
    if not isinstance(x, torch.Tensor):
        return  # check_inputs names the bad argument
    device = x.device
    for t in (weight, bias, lora_A, lora_B):
        if isinstance(t, torch.Tensor) and t.device != device:
            named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
            devices = {n: v.device for n, v in named.items() if isinstance(v, torch.Tensor)}
            raise ValueError(f"all tensors must be on one device, got {devices}")


def _check_scalar(name: str, value, device: torch.device) -> None:
    """A Python number, or a one-element floating-point tensor on the CPU or on x's `device`
    (either compiles without recompiles; one on x's device is never read on the host while
    traced on the Triton path, see ops.ScalarDict)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.device.type not in ("cpu", device.type):
            raise TypeError(
                f"{name} as a tensor must be a one-element floating-point tensor on the CPU or on x's device "
                f"({device}), got shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
            )
        if value.requires_grad:
            raise TypeError(f"{name} as a tensor must not require grad: lora_linear gives it no gradient")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number or a one-element tensor, got {type(value).__name__}")
    elif name == "scaling":
        check_scaling_value(value)


# The kernels take scaling as a float32 argument: a larger magnitude would become inf
# there and raise in the reference's addmm_, so it is refused on both.
_FLOAT32_MAX = 3.4028234663852886e38


def check_scaling_value(value: float) -> None:
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ValueError(f"scaling must be finite and within float32 range, got {value}")


def check_dropout_value(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {value}")


SEED_HIGH = 2**62
# Dtypes autocast may cast (it leaves float64 alone, as torch's autocast does).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def draw_seed() -> int:
    """A dropout seed from PyTorch's default CPU generator (so torch.manual_seed fixes it)."""
    return int(torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64))


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for device types autocast does not
    know (meta), where torch raises instead."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_off(t: torch.Tensor):
    """Disable autocast inside the op body (it computes in its inputs' dtypes), for t's
    device type. One flag read when no autocast is on at all: asking for t's device type
    costs ~30 µs a call with cold caches (benchmarks/NOTES.md, 2026-12-01)."""
    if torch._C._is_any_autocast_enabled() and autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def without_autocast(t: torch.Tensor, fn, *args, **kwargs):
    """fn(*args, **kwargs) with autocast off for t's device type: `autocast_off` as a call,
    for the hot cores. With no autocast on, fn is called directly: a `with` block's
    context-manager object and its __enter__ / __exit__ calls cost ~13 µs per backward
    with cold caches (benchmarks/NOTES.md, 2026-12-01)."""
    if torch._C._is_any_autocast_enabled():
        with autocast_off(t):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def _kernels() -> ModuleType:
    from lorakern import kernels  # lazily: importing lorakern does not import Triton

    return kernels


def implementation(backend: str) -> ModuleType:
    """The module with lora_linear_forward / lora_linear_backward for a resolved backend."""
    return _kernels() if backend == "triton" else reference


def rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as [M, C], M the product of the leading dims (a view where possible; t
    itself when already 2-D, the common case, for the host time of a reshape).
    Not reshape(-1, C): that is ambiguous, and raises, when C == 0."""
    if t.dim() == 2:
        return t
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def unrows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A kernel's 2-D result t [M, C] back to `like`'s leading dims: [..., C]. With
    _unsafe_view, as aten::linear does for >2-D inputs: the result is not marked a view of
    the kernel's 2-D buffer (FSDP2 warns when a module returns a view)."""
    if like.dim() == 2:
        return t
    return torch.ops.aten._unsafe_view(t, (*like.shape[:-1], t.shape[-1]))


def forward_core(x, weight, bias, lora_A, lora_B, s: float, p: float, seed: int, backend: str,
                 need_S: bool = True):
    """x [..., K] -> (y [..., N] in x's dtype, S [M, r] fp32 (fp64 for fp64 x)); with
    need_S=False (no backward will run) S may be None."""
    forward = implementation(backend).lora_linear_forward
    args = (rows(x), weight, bias, lora_A, lora_B, s, p, seed)
    y, S = without_autocast(x, forward, *args) if need_S else without_autocast(x, forward, *args, need_S=False)
    return unrows(y, x), S


def backward_core(dy, x, weight, lora_A, lora_B, S, s: float, p: float, seed: int, backend: str,
                  need_x: bool, need_a: bool, need_b: bool):
    """dy [..., N], x [..., K] -> (dx [..., K], dA [r, K], dB [N, r]), None where not needed."""
    dx, dA, dB = without_autocast(dy, implementation(backend).lora_linear_backward,
                                  rows(dy), rows(x), weight, lora_A, lora_B, S, s, p, seed, (need_x, need_a, need_b))
    return (None if dx is None else unrows(dx, x)), dA, dB


def base_grads(dy, x, weight, bias_dtype, need_w: bool, need_bias: bool):
    """dW = dYᵀ x [N, K] and dbias = Σ_rows dY [N] (each None unless needed)."""
    dW = dbias = None
    if need_w or need_bias:
        dy2 = rows(dy)
    if need_w:
        dW = (dy2.t() @ rows(x)).to(weight.dtype)
    if need_bias:
        dbias = dy2.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(bias_dtype)
    return dW, dbias


BACKWARD_DOC = """Backward, with dY = ∂L/∂y (x [..., K] seen as [M, K]):
        dS = s · dY B             [M, r]   dB = s · dYᵀ S    [N, r]
        dA = dSᵀ D(x)             [r, K]   (D's mask regenerated from the seed)
        dx = dY W + D(dS A)       [M, K]
        dbias = Σ_rows dY          dW = dYᵀ x   (only when they require grad)
    Saved: x, S (fp32, [M, r]) and the seed, plus the parameters; never a mask."""


# The gradients are not themselves differentiable (S is saved as a constant; the kernels
# are opaque to autograd), so create_graph=True gets this error on every backend rather
# than a second derivative that is silently wrong (or silently missing a term).
SECOND_ORDER_ERROR = (
    "lorakern.lora_linear does not support higher-order gradients: backward/autograd.grad "
    "with create_graph=True reached a LoRA layer. Its first-order gradients are exact, but "
    "they are not differentiable; compute second-order terms (gradient penalties, "
    "Hessian-vector products) without lorakern layers in that graph."
)


def bwd_outputs(dy, lora_A, lora_B, dx, dA, dB):
    """A backward op's outputs: a gradient not computed becomes an empty [0] tensor, one
    fresh empty per output (custom-op outputs may not alias each other)."""
    return (
        dy.new_empty(0) if dx is None else dx,
        lora_A.new_empty(0) if dA is None else dA,
        lora_B.new_empty(0) if dB is None else dB,
    )


def op_grads(ctx, dy, x, weight, bwd_op, *bwd_args) -> tuple:
    """(dx, dW, dbias, dA, dB) of a LoRA forward's autograd, given its ctx (needs_input_grad
    of x, weight, bias, lora_A, lora_B first; bias_dtype) and its backward:
    `bwd_op(*bwd_args, need_x, need_a, need_b)` -> (dx, dA, dB), where a gradient not needed
    may be None (`backward_core`) or an empty [0] tensor (the registered backward ops).
    The backward is passed with its arguments, not as a closure: on the eager route this
    is host time of every training step (benchmarks/NOTES.md, 2026-12-01)."""
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    dx = dA = dB = dW = dbias = None
    if need_x or need_a or need_b:
        dx, dA, dB = bwd_op(*bwd_args, need_x, need_a, need_b)
        dx, dA, dB = (dx if need_x else None), (dA if need_a else None), (dB if need_b else None)
    if need_w or need_bias:
        dW, dbias = base_grads(dy, x, weight, ctx.bias_dtype, need_w, need_bias)
    return dx, dW, dbias, dA, dB


def autocast_inputs(x, weight, bias, lora_A, lora_B):
    """Under autocast, cast like F.linear: x, weight, bias to the autocast dtype; adapters
    keep float32 (fp32 masters, read in fp32 by the op), other adapter dtypes are cast."""
    if not isinstance(x, torch.Tensor) or not autocast_enabled(x.device.type):
        return x, weight, bias, lora_A, lora_B
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t, keep_fp32: bool = False):
        if not isinstance(t, torch.Tensor) or t.dtype == dtype or t.dtype not in _AUTOCAST_ELIGIBLE:
            return t
        if keep_fp32 and t.dtype == torch.float32:
            return t
        return t.to(dtype)

    return cast(x), cast(weight), cast(bias), cast(lora_A, True), cast(lora_B, True)


def _check_seed(seed) -> None:
    """A seed is None, an int in [0, 2**63) or a one-element int64 CPU tensor."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise TypeError(
                f"seed as a tensor must be one int64 CPU element, got shape {tuple(seed.shape)}, "
                f"dtype {seed.dtype}, device {seed.device}"
            )
    elif seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(
                f"seed must be an int in [0, 2**63) or a one-element int64 CPU tensor, "
                f"got {type(seed).__name__} {seed!r}"
            )
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def scalar_tensors(scaling, dropout_p, seed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Python numbers -> 0-d CPU tensors for the registered ops (tensors pass through);
    types as `check_inputs` accepted them, values read later by `scalar_values`."""
    if not isinstance(scaling, torch.Tensor):
        scaling = torch.tensor(float(scaling), dtype=torch.float64)
    if not isinstance(dropout_p, torch.Tensor):
        dropout_p = torch.tensor(float(dropout_p), dtype=torch.float64)
    if seed is not None and not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    return scaling, dropout_p, seed


def scalar_values(scaling, dropout_p, seed) -> tuple[float, float, int]:
    """(s, p, seed) as validated Python numbers, from numbers or one-element CPU tensors
    (read on the host: no device synchronisation). The seed is resolved: the given one,
    else drawn from torch's default CPU generator when p > 0 (so torch.manual_seed and
    activation checkpointing, which restores that generator, reproduce the mask), else 0."""
    s, p = float(scaling), float(dropout_p)
    check_dropout_value(p)
    check_scaling_value(s)
    if seed is None:
        return s, p, (draw_seed() if p > 0.0 else 0)
    seed = int(seed)
    if seed < 0:  # a tensor seed's value, read here
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return s, p, seed
