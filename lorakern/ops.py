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
through device memory instead, see lorakern/triton_ops.py; there a scaling may also be a
tensor on x's device, a ScalarDict mirror, which the graph uses without any host op). When no seed is given and
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

import math
from collections.abc import Callable

import torch

from lorakern import settings
from lorakern.op_core import (
    BACKWARD_DOC, SECOND_ORDER_ERROR, SUPPORTED_DTYPES, autocast_inputs, backward_core, bwd_outputs, check_devices,
    check_inputs, forward_core, op_grads, scalar_tensors, scalar_values,
)

BACKENDS = settings.BACKENDS
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


# --- eager: an autograd.Function --------------------------------------------------

class LoraLinearFunction(torch.autograd.Function):
    """Eager autograd for y = x Wᵀ + s·S Bᵀ + bias with S = D(x) Aᵀ.

    ``apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)`` with
    the Python numbers `scalar_values` returns (the seed resolved) and a resolved
    backend. Returns y [..., N]. `lora_linear` takes this path in eager mode (it costs
    less per call than the dispatcher's custom-op path) and the registered op under
    torch.compile.

    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
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
        grads = op_grads(ctx, dy, x, weight, backward_core,
                         dy, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend)
        return (*grads, None, None, None, None)


LoraLinearFunction.__doc__ += BACKWARD_DOC


def _c_apply():
    """The C apply under torch.autograd.Function.apply, bound to LoraLinearFunction, and
    functorch's unwrap_if_dead; (None, None) where this torch does not expose them (then the
    Python apply runs)."""
    try:
        return torch._C._FunctionBase.__dict__["apply"].__get__(None, LoraLinearFunction), torch._C._functorch.unwrap_if_dead
    except (AttributeError, KeyError):
        return None, None


_C_APPLY, _UNWRAP_IF_DEAD = _c_apply()


def apply_function(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int, backend: str):
    """``LoraLinearFunction.apply(...)`` without torch.autograd.Function.apply's Python
    wrapper, which costs ~25 µs a call with cold caches (benchmarks/NOTES.md, 2026-12-01).
    For a Function without setup_context that wrapper does two things, both kept here: under
    functorch transforms it takes functorch's path (the Python apply runs, and refuses this
    Function); otherwise it unwraps dead functorch wrappers among the tensor arguments and
    calls the C apply. tests/test_op.py checks that the wrapper still reads so."""
    if _C_APPLY is None or torch._C._are_functorch_transforms_active():
        return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
    unwrap = _UNWRAP_IF_DEAD  # weight (LoRA term alone) and bias may be None
    return _C_APPLY(unwrap(x), None if weight is None else unwrap(weight), None if bias is None else unwrap(bias),
                    unwrap(lora_A), unwrap(lora_B), scaling, dropout_p, seed, backend)


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
    s, p, seed = scalar_values(scaling, dropout_p, seed)
    y, S = forward_core(x, weight, bias, lora_A, lora_B, s, p, seed, backend)
    return y, S, torch.tensor(seed, dtype=torch.int64)  # a fresh tensor: an output may not alias an input


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
    dx, dA, dB = backward_core(
        dy, x, weight, lora_A, lora_B, S, float(scaling), float(dropout_p), int(seed), backend, need_x, need_a, need_b,
    )
    return bwd_outputs(dy, lora_A, lora_B, dx, dA, dB)


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


def _backward(ctx, dy, _dS, _dseed):
    x, weight, lora_A, lora_B, S, scaling, dropout_p, seed = ctx.saved_tensors
    grads = op_grads(ctx, dy, x, weight, lora_linear_bwd,
                     dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, ctx.backend)
    return (*grads, None, None, None, None)


_backward.__doc__ = "Autograd of lorakern::lora_linear_fwd.\n\n    " + BACKWARD_DOC
lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# torch.library.triton_op / wrap_triton (torch >= 2.6); older torch keeps the opaque op.
_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def use_triton_op() -> bool:
    """Whether traced Triton-backend calls take lorakern.triton_ops (the compiler sees the
    kernels) rather than the opaque custom op: yes when Triton compiles its kernels (not
    the interpreter) and torch has triton_op, unless LORAKERN_TRITON_OP=0."""
    return settings.triton_op and _HAS_TRITON_OP and not interpreting()


def plain_tensors(*tensors) -> bool:
    """True when no tensor is a subclass (FakeTensor, DTensor, ...) other than Parameter."""
    for t in tensors:  # a loop, not all(<generator>): this runs on every eager layer call
        if t is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False
    return True


class ScalarDict(dict):
    """A dict of Python floats (PEFT's ``scaling`` / ``lora_dropout``) that keeps a
    float64 CPU tensor mirror (shape [1]) of each value, updated in place on assignment,
    and, once `place`d on an accelerator, a second mirror there.

    Passing ``d.tensor(key)`` to `lora_linear` instead of ``d[key]`` lets torch.compile
    treat the value as a graph input: assigning ``d[key] = v`` later does not recompile.
    The mirror is [1], not 0-d: dynamo traces a 0-d float64 CPU input as a Python float
    symbol and, on first compile, specializes it and restarts its analysis.
    ``d.tensor(key, x.device)`` is the mirror on x's device when the dict is placed there
    (else the CPU one): on the traced Triton route the op builds the kernels' scalars from
    it inside the graph, with no host op and no CPU input, so CUDA graphs
    (``torch.compile(mode="reduce-overhead")``) can capture the call. The device mirrors are
    marked static (their address never changes), so a captured graph reads each new value.

    check: called with every value assigned (e.g. op_core.check_scaling_value); values are
    validated here because a traced call reading a device mirror never sees them on the host.

    Example:
        >>> d = ScalarDict({"default": 0.5})
        >>> t = d.tensor("default"); d["default"] = 2.0
        >>> d["default"], t.item()
        (2.0, 2.0)
    """

    def __init__(self, values=(), check: Callable[[float], None] | None = None):
        super().__init__()
        self._check = check
        self._tensors: dict[str, torch.Tensor] = {}
        self._positive: dict[str, bool] = {}
        self._device: torch.device | None = None  # where `place` put the second mirrors
        self._device_tensors: dict[str, torch.Tensor] = {}
        self.update(values)

    def __reduce__(self):
        # Pickle / copy / deepcopy rebuild through __init__, so the mirrors exist before
        # any item is set (the default dict-subclass protocol sets items first). The device
        # mirrors are not carried: the owner places the copy (LoraLinear._apply).
        return (type(self), (dict(self), self._check))

    def __setitem__(self, key, value) -> None:
        value = float(value)
        if self._check is not None:
            self._check(value)
        self._assign(key, value)

    def _assign(self, key, value: float) -> None:
        """Set a checked value and fill its mirrors in place (made on first assignment)."""
        super().__setitem__(key, value)
        self._positive[key] = value > 0.0
        _fill(self._tensors, key, value, lambda v: torch.tensor([v], dtype=torch.float64))
        if self._device is not None:
            _fill(self._device_tensors, key, value, self._device_mirror)

    def _device_mirror(self, value: float) -> torch.Tensor:
        from torch._dynamo import mark_static_address

        t = torch.full((1,), value, dtype=torch.float64, device=self._device)
        mark_static_address(t)  # CUDA graphs read it in place, never copy it
        return t

    def place(self, device: torch.device | str) -> None:
        """Keep a mirror of every value on `device` (a no-op if already there); a CPU
        `device` drops the device mirrors (the CPU ones serve)."""
        device = torch.device(device)
        if device.type == "cpu":
            self._device, self._device_tensors = None, {}
        elif device != self._device:
            self._device = device
            self._device_tensors = {key: self._device_mirror(value) for key, value in self.items()}

    def _forget(self, key) -> None:
        """Drop the mirrors and flag of a removed key."""
        self._tensors.pop(key, None)
        self._device_tensors.pop(key, None)
        self._positive.pop(key, None)

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._forget(key)

    def update(self, *args, **kwargs) -> None:
        items = {key: float(value) for key, value in dict(*args, **kwargs).items()}
        if self._check is not None:  # every value first: a refused one changes nothing
            for value in items.values():
                self._check(value)
        for key, value in items.items():
            self._assign(key, value)

    def __ior__(self, other):  # d |= {...}: dict's own would skip the mirrors and the check
        self.update(other)
        return self

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
        self._device_tensors.clear()
        self._positive.clear()

    def is_positive(self, key) -> bool:
        """Whether the value of `key` is > 0, kept as a bool of its own: torch.compile
        guards on this flag, so a change that keeps it (0.1 -> 0.2) does not recompile."""
        return self._positive[key]

    def tensor(self, key, device: torch.device | None = None) -> torch.Tensor:
        """The value of `key` as a [1] float64 tensor (the same tensor on every call): on
        `device` when the dict is placed there, else on the CPU.

        Plain attribute reads: torch.compile traces this, and dynamo in torch 2.11
        cannot trace `__dict__.setdefault` (a graph break at every layer, seen on an H200).
        """
        if device is not None and device == self._device:
            return self._device_tensors[key]
        return self._tensors[key]


def _fill(mirrors: dict, key, value: float, make: Callable[[float], torch.Tensor]) -> None:
    """mirrors[key] filled with value in place, or made by `make` the first time."""
    mirror = mirrors.get(key)
    if mirror is None:
        mirrors[key] = make(value)
    else:
        mirror.fill_(value)


def scalar_device(backend: str, device: torch.device, dtype: torch.dtype) -> torch.device | None:
    """Where a layer's traced call takes its ScalarDict mirrors from: `device` (x's) while
    torch.compile traces the Triton-op route, whose op builds the kernels' scalars from
    them inside the graph; None (the CPU mirrors, read on the host by the opaque op or
    `triton_ops.device_scalars`) otherwise."""
    if not (torch.compiler.is_compiling() and use_triton_op()):
        return None
    return device if resolve_backend(backend, device, dtype) == "triton" else None


# --- the public functional ----------------------------------------------------------


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
            number or a one-element floating-point tensor on the CPU or on x's device (a
            tensor's value can change without recompiling under torch.compile; one on x's
            device stays there on the traced Triton route without dropout, so CUDA graphs
            can capture the call, and is read on the host — a synchronisation — elsewhere).
        dropout_p: inverted-dropout probability on the LoRA branch's input, in [0, 1);
            a Python number or a one-element tensor, as scaling.
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
    check_devices(x, weight, bias, lora_A, lora_B)
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    backend = resolve_backend(backend, x.device, x.dtype)
    if torch.compiler.is_compiling() or not plain_tensors(x, weight, bias, lora_A, lora_B):
        # Traced (torch.compile, export) or tensor subclasses: the registered ops, which
        # read the scalars' values in their bodies. Triton kernels compiled (not
        # interpreted): triton_ops, whose kernels the compiler sees; otherwise the opaque
        # custom op.
        has_dropout = isinstance(dropout_p, torch.Tensor) or dropout_p > 0.0
        if backend == "triton" and use_triton_op():
            from lorakern import triton_ops

            return triton_ops.lora_linear_traced(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, has_dropout)
        scaling, dropout_p, seed = scalar_tensors(scaling, dropout_p, seed)
        return lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)[0]
    scaling, dropout_p, seed = scalar_values(scaling, dropout_p, seed)
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)
    ):
        # Nothing to differentiate (inference, decode): the same forward without the
        # autograd.Function's bookkeeping (~15 µs a call on CPU).
        return forward_core(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, need_S=False)[0]
    return apply_function(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
