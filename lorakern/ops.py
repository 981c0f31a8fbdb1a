"""The fused LoRA linear as a registered PyTorch op, and backend dispatch.

    y = x Wᵀ + s · (D(x) Aᵀ) Bᵀ + bias

`lora_linear` is the public functional. When traced (torch.compile, export) or given
tensor subclasses it calls registered ops, so `torch.compile(..., fullgraph=True)`
traces through a LoRA model without graph breaks:
- the Triton backend with compiled kernels (torch >= 2.6): the `triton_op`s of
  `lorakern.triton_ops`, whose kernel launches the compiler sees (`use_triton_op`;
  LORAKERN_TRITON_OP=0 turns it off);
- otherwise (reference backend, Triton's interpreter, older torch) two opaque custom
  ops, `lorakern::lora_linear_fwd` and `lorakern::lora_linear_bwd`, with fake (meta)
  implementations and an autograd registration.
In plain eager mode it calls `LoraLinearFunction`, an autograd.Function over the same
math (the custom-op dispatcher costs ~60 µs more per forward + backward).

Backends (DESIGN.md §3): "triton" runs the kernels in `lorakern.kernels` (on CUDA, or
on CPU under TRITON_INTERPRET=1); "reference" runs `lorakern.reference` (plain
PyTorch, the CPU path); "auto" picks Triton for CUDA tensors when it is importable,
the reference otherwise. LORAKERN_BACKEND overrides "auto".

Scalars travel as one-element CPU tensors (scaling and dropout_p float64, seed int64):
the compiler treats them as graph inputs, not constants, so changing an adapter's
scaling or dropout probability does not recompile, and the ops read them on the host
without a device synchronisation (the traced Triton path hands them to the kernels
through device memory instead, see lorakern/triton_ops.py). When no seed is given and
dropout is on, the forward op draws the seed from torch's default CPU generator itself
and returns it for the backward: `torch.manual_seed` reproduces the mask, and
activation checkpointing (which restores the CPU RNG state before recomputing)
regenerates the same mask.

Autocast: under `torch.autocast(device_type)` the op behaves like `F.linear` — x,
weight and bias are cast to the autocast dtype; float32 adapters stay float32 (the
op reads them in fp32 and casts in registers), other adapters are cast too; each
gradient comes back in its input's own dtype.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from types import ModuleType

import torch

from lorakern import reference, settings

BACKENDS = settings.BACKENDS
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 runs on the reference backend only (for gradcheck and as an fp64 oracle).
REFERENCE_ONLY_DTYPES = (torch.float64,)
_ACCEPTED_DTYPES = SUPPORTED_DTYPES + REFERENCE_ONLY_DTYPES


_TRITON_PROBE: list[tuple[bool, str]] = []


@torch.compiler.assume_constant_result  # torch.compile: run while tracing, keep the result
def triton_available() -> tuple[bool, str]:
    """(True, version) when Triton imports; (False, reason) otherwise. Cached, lazy."""
    if not _TRITON_PROBE:
        try:
            import triton
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_PROBE.append((False, f"triton does not import: {exc}"))
        else:
            _TRITON_PROBE.append((True, triton.__version__))
    return _TRITON_PROBE[0]


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return settings.interpret


def _kernels() -> ModuleType:
    from lorakern import kernels

    return kernels


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Map "auto" (or LORAKERN_BACKEND) to "triton" or "reference" for `dtype` tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = settings.backend
    if backend == "auto":
        use_triton = device.type == "cuda" and dtype in SUPPORTED_DTYPES and triton_available()[0]
        return "triton" if use_triton else "reference"
    if backend == "triton":
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend='triton' supports float32, float16 and bfloat16, got {dtype}")
        ok, why = triton_available()
        if not ok:
            raise RuntimeError(f"backend='triton' requested but {why}")
        if device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                "lorakern is imported (Triton's interpreter); use backend='reference' on CPU"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports cuda (or cpu when interpreting), got {device}")
    return backend


def _implementation(backend: str) -> ModuleType:
    return _kernels() if backend == "triton" else reference


def check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    """Raise TypeError / ValueError naming the offending shapes or dtypes (devices are
    `_check_devices`', which runs first: autocast asks x's device type before this)."""
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
    _check_scalar("scaling", scaling)
    _check_scalar("dropout_p", dropout_p)
    # A tensor's value is checked inside the op, on the host (no graph break here).
    if not isinstance(dropout_p, torch.Tensor) and not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _check_devices(x, weight, bias, lora_A, lora_B) -> None:
    """All tensors on x's device (checked before autocast, which asks x's device type)."""
    if not isinstance(x, torch.Tensor):
        return  # check_inputs names the bad argument
    device = x.device
    for t in (weight, bias, lora_A, lora_B):
        if isinstance(t, torch.Tensor) and t.device != device:
            named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
            devices = {n: v.device for n, v in named.items() if isinstance(v, torch.Tensor)}
            raise ValueError(f"all tensors must be on one device, got {devices}")


def _check_scalar(name: str, value) -> None:
    """A Python number, or a one-element floating-point CPU tensor (compiles without recompiles)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.device.type != "cpu":
            raise TypeError(
                f"{name} as a tensor must be a one-element floating-point CPU tensor, got "
                f"shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
            )
        if value.requires_grad:
            raise TypeError(f"{name} as a tensor must not require grad: lora_linear gives it no gradient")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number or a one-element CPU tensor, got {type(value).__name__}")
    elif name == "scaling":
        _check_scaling_value(value)


# The kernels take scaling as a float32 argument: a larger magnitude would become inf
# there and raise in the reference's addmm_, so it is refused on both.
_FLOAT32_MAX = 3.4028234663852886e38


def _check_scaling_value(value: float) -> None:
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ValueError(f"scaling must be finite and within float32 range, got {value}")


SEED_HIGH = 2**62
# Dtypes autocast may cast (it leaves float64 alone, as torch's autocast does).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def draw_seed() -> int:
    """A dropout seed from PyTorch's default CPU generator (so torch.manual_seed fixes it)."""
    return int(_draw_seed_tensor().item())


def _draw_seed_tensor() -> torch.Tensor:
    """draw_seed() as a 0-d int64 CPU tensor: no host read, so usable inside the op."""
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64).view(())


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for device types autocast does not
    know (meta), where torch raises instead."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _autocast_off(device_type: str):
    """Disable autocast inside the op body (it computes in its inputs' dtypes)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# --- the math both entry points share --------------------------------------------


def rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as [M, C], M the product of the leading dims (a view where possible).
    Not reshape(-1, C): that is ambiguous, and raises, when C == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def unrows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A kernel's 2-D result t [M, C] back to `like`'s leading dims: [..., C]. With
    _unsafe_view, as aten::linear does for >2-D inputs: the result is not marked a view of
    the kernel's 2-D buffer (FSDP2 warns when a module returns a view)."""
    if like.dim() == 2:
        return t
    return torch.ops.aten._unsafe_view(t, (*like.shape[:-1], t.shape[-1]))


def forward_core(x, weight, bias, lora_A, lora_B, s: float, p: float, seed: int, backend: str):
    """x [..., K] -> (y [..., N] in x's dtype, S [M, r] fp32 (fp64 for fp64 x))."""
    with _autocast_off(x.device.type):
        y, S = _implementation(backend).lora_linear_forward(
            rows(x), weight, bias, lora_A, lora_B, s, p, seed
        )
    return unrows(y, x), S


def _backward_core(dy, x, weight, lora_A, lora_B, S, s: float, p: float, seed: int, backend: str, needs):
    """dy [..., N], x [..., K] -> (dx [..., K], dA [r, K], dB [N, r]), None where not needed."""
    with _autocast_off(dy.device.type):
        dx, dA, dB = _implementation(backend).lora_linear_backward(
            rows(dy), rows(x), weight, lora_A, lora_B, S,
            s, p, seed, needs,
        )
    return (None if dx is None else unrows(dx, x)), dA, dB


def _base_grads(dy, x, weight, bias_dtype, need_w: bool, need_bias: bool):
    """dW = dYᵀ x [N, K] and dbias = Σ_rows dY [N] (each None unless needed)."""
    dW = dbias = None
    if need_w or need_bias:
        dy2 = rows(dy)
    if need_w:
        dW = (dy2.t() @ rows(x)).to(weight.dtype)
    if need_bias:
        dbias = dy2.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(bias_dtype)
    return dW, dbias


_BACKWARD_DOC = """Backward, with dY = ∂L/∂y (x [..., K] seen as [M, K]):
        dS = s · dY B             [M, r]   dB = s · dYᵀ S    [N, r]
        dA = dSᵀ D(x)             [r, K]   (D's mask regenerated from the seed)
        dx = dY W + D(dS A)       [M, K]
        dbias = Σ_rows dY          dW = dYᵀ x   (only when they require grad)
    Saved: x, S (fp32, [M, r]) and the seed, plus the parameters; never a mask."""


# --- eager: an autograd.Function --------------------------------------------------

# The gradients are not themselves differentiable (S is saved as a constant; the kernels
# are opaque to autograd), so create_graph=True gets this error on every backend rather
# than a second derivative that is silently wrong (or silently missing a term).
SECOND_ORDER_ERROR = (
    "lorakern.lora_linear does not support higher-order gradients: backward/autograd.grad "
    "with create_graph=True reached a LoRA layer. Its first-order gradients are exact, but "
    "they are not differentiable; compute second-order terms (gradient penalties, "
    "Hessian-vector products) without lorakern layers in that graph."
)


def _eager_seed(seed: int | None, dropout_p: float) -> int:
    """The seed an eager call uses: the given one, else drawn when dropout is on."""
    if seed is None:
        return draw_seed() if dropout_p > 0.0 else 0
    return seed


class LoraLinearFunction(torch.autograd.Function):
    """Eager autograd for y = x Wᵀ + s·S Bᵀ + bias with S = D(x) Aᵀ.

    ``apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)`` with
    Python-number scaling / dropout_p, an int seed (None: drawn from torch's CPU
    generator when dropout_p > 0) and a resolved backend. Returns y [..., N].
    `lora_linear` takes this path in eager mode (it costs less per call than the
    dispatcher's custom-op path) and the registered op under torch.compile.

    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
        seed = _eager_seed(seed, dropout_p)
        y, S = forward_core(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x, weight, lora_A, lora_B, S)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative is coming
            raise RuntimeError(SECOND_ORDER_ERROR)
        x, weight, lora_A, lora_B, S = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dx = dA = dB = None
        if need_x or need_a or need_b:
            dx, dA, dB = _backward_core(
                dy, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend,
                (need_x, need_a, need_b),
            )
        dW, dbias = _base_grads(dy, x, weight, ctx.bias_dtype, need_w, need_bias)
        return dx, dW, dbias, dA, dB, None, None, None, None


LoraLinearFunction.__doc__ += _BACKWARD_DOC


# --- torch.compile: the registered ops ---------------------------------------------

_FWD_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor scaling, Tensor dropout_p, Tensor? seed, str backend) -> (Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor S, "
    "Tensor scaling, Tensor dropout_p, Tensor seed, str backend, "
    "bool need_x, bool need_a, bool need_b) -> (Tensor, Tensor, Tensor)"
)


@torch.library.custom_op(
    "lorakern::lora_linear_fwd", mutates_args=(), schema=_FWD_SCHEMA,
    tags=(torch.Tag.nondeterministic_seeded,),
)
def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    """Forward on x [..., K] -> (y [..., N] x's dtype, S [M, r] fp32 (fp64 for fp64 x), seed),
    M the product of x's leading dims. The reshapes happen inside the op, so y is not a
    view of anything the caller sees (FSDP2 warns about modules returning views).

    scaling, dropout_p: one-element CPU float tensors; seed: one-element CPU int64 tensor,
    or None to draw one from torch's default CPU generator when dropout_p > 0 (0 otherwise).
    The seed actually used is returned so the backward regenerates the same mask.
    """
    s, p = float(scaling), float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if seed is None:
        seed = _draw_seed_tensor() if p > 0.0 else torch.zeros((), dtype=torch.int64)
    else:
        if int(seed) < 0:
            raise ValueError(f"seed must be in [0, 2**63), got {int(seed)}")
        seed = seed.reshape(()).clone()  # an output may not alias an input
    y, S = forward_core(x, weight, bias, lora_A, lora_B, s, p, int(seed), backend)
    return y, S, seed


@lora_linear_fwd.register_fake
def _lora_linear_fwd_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    m = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], lora_B.shape[0]))
    S = x.new_empty((m, lora_A.shape[0]), dtype=torch.promote_types(x.dtype, torch.float32))
    return y, S, torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("lorakern::lora_linear_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def lora_linear_bwd(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, backend, need_x, need_a, need_b):
    """LoRA backward: dy [..., N], x [..., K] -> (dx [..., K], dA [r, K], dB [N, r]).

    A gradient that is not needed comes back as an empty tensor (shape [0]).
    """
    dx, dA, dB = _backward_core(
        dy, x, weight, lora_A, lora_B, S, float(scaling), float(dropout_p), int(seed), backend,
        (need_x, need_a, need_b),
    )
    return _bwd_outputs(dy, lora_A, lora_B, dx, dA, dB)


def _bwd_outputs(dy, lora_A, lora_B, dx, dA, dB):
    """A backward op's outputs: a gradient not computed becomes an empty [0] tensor, one
    fresh empty per output (custom-op outputs may not alias each other)."""
    return (
        dy.new_empty(0) if dx is None else dx,
        lora_A.new_empty(0) if dA is None else dA,
        lora_B.new_empty(0) if dB is None else dB,
    )


@lora_linear_bwd.register_fake
def _lora_linear_bwd_fake(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, backend, need_x, need_a, need_b):
    return (
        x.new_empty(x.shape, dtype=dy.dtype) if need_x else dy.new_empty(0),
        lora_A.new_empty(lora_A.shape) if need_a else lora_A.new_empty(0),
        lora_B.new_empty(lora_B.shape) if need_b else lora_B.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, _, backend = inputs
    _, S, seed = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, S, scaling, dropout_p, seed)
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(S, seed)


def op_grads(ctx, dy, x, weight, bwd_op) -> tuple:
    """(dx, dW, dbias, dA, dB) of a registered forward op, given its ctx (needs_input_grad
    of x, weight, bias, lora_A, lora_B first; bias_dtype) and `bwd_op(need_x, need_a,
    need_b)`, the backward op call returning empty [0] tensors where not needed."""
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    dx = dA = dB = None
    if need_x or need_a or need_b:
        dx, dA, dB = bwd_op(need_x, need_a, need_b)
        dx, dA, dB = (dx if need_x else None), (dA if need_a else None), (dB if need_b else None)
    dW, dbias = _base_grads(dy, x, weight, ctx.bias_dtype, need_w, need_bias)
    return dx, dW, dbias, dA, dB


def _backward(ctx, dy, _dS, _dseed):
    x, weight, lora_A, lora_B, S, scaling, dropout_p, seed = ctx.saved_tensors
    grads = op_grads(ctx, dy, x, weight, lambda need_x, need_a, need_b: lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, ctx.backend, need_x, need_a, need_b,
    ))
    return (*grads, None, None, None, None)


_backward.__doc__ = "Autograd of lorakern::lora_linear_fwd.\n\n    " + _BACKWARD_DOC
lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# torch.library.triton_op / wrap_triton (torch >= 2.6); older torch keeps the opaque op.
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def use_triton_op() -> bool:
    """Whether traced Triton-backend calls take lorakern.triton_ops (the compiler sees the
    kernels) rather than the opaque custom op: yes when Triton compiles its kernels (not
    the interpreter) and torch has triton_op, unless LORAKERN_TRITON_OP=0."""
    return settings.triton_op and _HAS_TRITON_OP and not interpreting()


def _plain(*tensors) -> bool:
    """True when no tensor is a subclass (FakeTensor, DTensor, ...) other than Parameter."""
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


class ScalarDict(dict):
    """A dict of Python floats (PEFT's ``scaling`` / ``lora_dropout``) that keeps a
    float64 CPU tensor mirror (shape [1]) of each value, updated in place on assignment.

    Passing ``d.tensor(key)`` to `lora_linear` instead of ``d[key]`` lets torch.compile
    treat the value as a graph input: assigning ``d[key] = v`` later does not recompile.
    The mirror is [1], not 0-d: dynamo traces a 0-d float64 CPU input as a Python float
    symbol and, on first compile, specializes it and restarts its analysis.

    Example:
        >>> d = ScalarDict(default=0.5)
        >>> t = d.tensor("default"); d["default"] = 2.0
        >>> d["default"], t.item()
        (2.0, 2.0)
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        self._tensors: dict[str, torch.Tensor] = {}
        self._positive: dict[str, bool] = {}
        self.update(*args, **kwargs)

    def __reduce__(self):
        # Pickle / copy / deepcopy rebuild through __init__, so the mirrors exist before
        # any item is set (the default dict-subclass protocol sets items first).
        return (type(self), (dict(self),))

    def __setitem__(self, key, value) -> None:
        value = float(value)
        super().__setitem__(key, value)
        self._positive[key] = value > 0.0
        mirror = self._tensors.get(key)
        if mirror is None:
            self._tensors[key] = torch.tensor([value], dtype=torch.float64)
        else:
            mirror.fill_(value)

    def _forget(self, key) -> None:
        """Drop the mirror and flag of a removed key."""
        self._tensors.pop(key, None)
        self._positive.pop(key, None)

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._forget(key)

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=0.0):
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key, *default):
        self._forget(key)
        return super().pop(key, *default)

    def popitem(self):
        key, value = super().popitem()
        self._forget(key)
        return key, value

    def clear(self) -> None:
        super().clear()
        self._tensors.clear()
        self._positive.clear()

    def is_positive(self, key) -> bool:
        """Whether the value of `key` is > 0, kept as a bool of its own: torch.compile
        guards on this flag, so a change that keeps it (0.1 -> 0.2) does not recompile."""
        return self._positive[key]

    def tensor(self, key) -> torch.Tensor:
        """The value of `key` as a [1] float64 CPU tensor (the same tensor on every call).

        A plain attribute read: torch.compile traces this, and dynamo in torch 2.11
        cannot trace `__dict__.setdefault` (a graph break at every layer, seen on an H200).
        """
        return self._tensors[key]


# --- the public functional ----------------------------------------------------------


def _autocast_inputs(x, weight, bias, lora_A, lora_B):
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


def _scalar_tensors(scaling, dropout_p, seed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Python numbers -> 0-d CPU tensors for the registered op (tensors pass through)."""
    _check_seed(seed)
    if not isinstance(scaling, torch.Tensor):
        scaling = torch.tensor(float(scaling), dtype=torch.float64)
    if not isinstance(dropout_p, torch.Tensor):
        dropout_p = torch.tensor(float(dropout_p), dtype=torch.float64)
    if seed is not None and not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    return scaling, dropout_p, seed


def eager_scalars(scaling, dropout_p, seed) -> tuple[float, float, int | None]:
    """scaling, dropout_p, seed as Python numbers for the eager path, values checked (a
    scalar tensor is read on the host: it lives on the CPU, so no device synchronisation)."""
    scaling, dropout_p = float(scaling), float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    _check_scaling_value(scaling)  # a tensor's value is read only here
    _check_seed(seed)
    if seed is not None:
        seed = int(seed)
        if seed < 0:  # a tensor seed's value, read here
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return scaling, dropout_p, seed


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    *,
    dropout_p: float | torch.Tensor = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused LoRA linear: ``x Wᵀ + bias + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: [..., K] input (float32, float16 or bfloat16).
        weight: [N, K] base weight (nn.Linear layout), x's dtype; or None for the LoRA
            term alone (no base GEMM; bias must then be None).
        bias: [N] or None, x's dtype.
        lora_A: [r, K]; lora_B: [N, r]; each in x's dtype or float32.
        scaling: the LoRA scale s (alpha / r, or alpha / sqrt(r) with rsLoRA); a Python
            number or a one-element CPU tensor (a tensor's value can change without recompiling
            under torch.compile).
        dropout_p: inverted-dropout probability on the LoRA branch's input, in [0, 1);
            a Python number or a one-element CPU tensor.
        seed: dropout seed (int, or a one-element int64 CPU tensor); None draws one from torch's
            default CPU generator (only when dropout is on).
        backend: "auto", "triton" or "reference".
    Under torch.autocast, x / weight / bias are cast to the autocast dtype (as F.linear
    does) and float32 adapters stay float32; the dtype rules above then apply to the
    cast tensors.
    Returns:
        y: [..., N] in x's dtype (the autocast dtype under autocast).

    Example:
        >>> import torch, lorakern
        >>> x, W = torch.randn(4, 8), torch.randn(6, 8)
        >>> A, B = torch.randn(2, 8), torch.randn(6, 2)
        >>> lorakern.lora_linear(x, W, None, A, B, 0.5).shape
        torch.Size([4, 6])
    """
    _check_devices(x, weight, bias, lora_A, lora_B)
    x, weight, bias, lora_A, lora_B = _autocast_inputs(x, weight, bias, lora_A, lora_B)
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    backend = resolve_backend(backend, x.device, x.dtype)
    if torch.compiler.is_compiling() or not _plain(x, weight, bias, lora_A, lora_B):
        # Traced (torch.compile, export) or tensor subclasses: the registered ops. Triton
        # kernels compiled (not interpreted): triton_ops, whose kernels the compiler sees;
        # otherwise the opaque custom op.
        has_dropout = isinstance(dropout_p, torch.Tensor) or dropout_p > 0.0
        scaling, dropout_p, seed = _scalar_tensors(scaling, dropout_p, seed)
        if backend == "triton" and use_triton_op():
            from lorakern import triton_ops

            return triton_ops.lora_linear_traced(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, has_dropout)
        return lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)[0]
    # Eager: the autograd.Function (same math).
    scaling, dropout_p, seed = eager_scalars(scaling, dropout_p, seed)
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)
    ):
        # Nothing to differentiate (inference, decode): the same forward without the
        # autograd.Function's bookkeeping (~15 µs a call on CPU).
        seed = _eager_seed(seed, dropout_p)
        return forward_core(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)[0]
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
