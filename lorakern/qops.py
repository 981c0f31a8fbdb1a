"""The fused LoRA linear over a quantized base weight (QLoRA).

    y = x dequant(Wq)ᵀ + s · (D(x) Aᵀ) Bᵀ + bias

The weight is dequantised into a transient dense tensor in x's dtype (on CUDA by the
Triton kernel in lorakern/kernels/dequant.py, elsewhere by lorakern.quant), the same op as the
dense path runs on it, and the dense tensor is dropped: the backward dequantises again
for dx = dY W + D(dS A). So the only things saved for the backward are what the dense
path saves (x, S, the seed) plus references to the quantized storage — never a dense
copy of the weight. The base never gets a gradient.

Numbers: identical to "dequantise (bitsandbytes' way), then `lora_linear`" — the
dequantised weight is bit-identical to bitsandbytes' and the op is the dense one.
Under torch.compile the dequantisation and both op halves are registered ops, traced
inside this autograd.Function.
"""

from __future__ import annotations

import torch

from lorakern import quant
from lorakern.op_core import (
    SECOND_ORDER_ERROR, autocast_inputs, autocast_off, backward_core, check_devices, check_inputs, forward_core,
    rows, scalar_tensors, scalar_values, unrows,
)
from lorakern.ops import lora_linear_bwd, lora_linear_fwd, resolve_backend
from lorakern.quant import QuantizedWeight

# The QuantizedWeight's tensors, in the order they travel as Function / op arguments.
_FIELDS = ("data", "absmax", "code", "offset", "nested_absmax", "nested_code")


def _dequantize_eager(meta, tensors, dtype: torch.dtype, backend: str) -> torch.Tensor:
    quant_type, blocksize, nested_blocksize, n, k = meta
    if backend == "triton":
        from lorakern import kernels

        return kernels.dequantize_weight(*tensors, quant_type, blocksize, nested_blocksize, (n, k), dtype)
    qw = QuantizedWeight(
        tensors[0], quant_type, (n, k), dtype, tensors[1], blocksize, *tensors[2:], nested_blocksize=nested_blocksize
    )
    return quant.dequantize_weight(qw, dtype)


@torch.library.custom_op("lorakern::dequantize", mutates_args=())
def dequantize_op(
    data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None, offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
    quant_type: str, blocksize: int, nested_blocksize: int, n: int, k: int, dtype: torch.dtype, backend: str,
) -> torch.Tensor:
    """The dense weight [n, k] in `dtype` (the registered form of `dequantize`, for tracing)."""
    tensors = (data, absmax, code, offset, nested_absmax, nested_code)
    return _dequantize_eager((quant_type, blocksize, nested_blocksize, n, k), tensors, dtype, backend)


@dequantize_op.register_fake
def _dequantize_fake(data, absmax, code, offset, nested_absmax, nested_code, quant_type, blocksize,
                     nested_blocksize, n, k, dtype, backend):
    return data.new_empty((n, k), dtype=dtype)


def _dequantize(meta, tensors, dtype: torch.dtype, backend: str) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return dequantize_op(*tensors, *meta, dtype, backend)
    return _dequantize_eager(meta, tensors, dtype, backend)


def _forward_eager(x, meta, qtensors, bias, lora_A, lora_B, s: float, p: float, seed: int, backend: str):
    """x [..., K] -> (y [..., N], S [M, r]). Triton: kernels.qlora_linear_forward (at
    small M it may read the 4-bit weight directly); reference: dequantise, then the op."""
    if backend != "triton":
        return forward_core(x, _dequantize_eager(meta, qtensors, x.dtype, backend), bias, lora_A, lora_B,
                             s, p, seed, backend)
    from lorakern import kernels

    with autocast_off(x):
        y, S = kernels.qlora_linear_forward(rows(x), qtensors, meta, bias, lora_A, lora_B, s, p, seed)
    return unrows(y, x), S


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """qw as a dense [N, K] tensor in `dtype` (default qw.dtype): the Triton kernel on CUDA,
    lorakern.quant elsewhere; the same bits either way."""
    dtype = qw.dtype if dtype is None else dtype
    backend = resolve_backend(backend, qw.device, dtype)
    return _dequantize(_meta(qw), _tensors(qw), dtype, backend)


def _meta(qw: QuantizedWeight) -> tuple:
    return (qw.quant_type, qw.blocksize, qw.nested_blocksize, qw.shape[0], qw.shape[1])


def _tensors(qw: QuantizedWeight) -> tuple:
    return tuple(getattr(qw, f) for f in _FIELDS)


class QuantLoraLinearFunction(torch.autograd.Function):
    """Autograd of the quantized op (eager and traced): ``apply(x, bias, lora_A, lora_B,
    scaling, dropout_p, seed, backend, meta, *quantized tensors)``.

    scaling / dropout_p / seed are `scalar_values`' Python numbers eagerly (the seed
    resolved), CPU tensors when traced (as for the dense op's registered form). Saved: x, S, the seed and the quantized
    tensors (the layer's own storage, not copies).
    """

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, meta, *qtensors):
        ctx.traced = torch.compiler.is_compiling()
        if ctx.traced:  # scalars are CPU tensors: saved as tensors, the seed as the op returns it
            weight = dequantize_op(*qtensors, *meta, x.dtype, backend)
            y, S, seed = lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
            ctx.save_for_backward(x, lora_A, lora_B, S, scaling, dropout_p, seed, *qtensors)
        else:
            y, S = _forward_eager(x, meta, qtensors, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
            ctx.save_for_backward(x, lora_A, lora_B, S, *qtensors)
            ctx.scalars = (scaling, dropout_p, seed)
        ctx.backend, ctx.meta = backend, meta
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_ORDER_ERROR)
        if ctx.traced:
            x, lora_A, lora_B, S, scaling, dropout_p, seed, *qtensors = ctx.saved_tensors
        else:
            x, lora_A, lora_B, S, *qtensors = ctx.saved_tensors
            scaling, dropout_p, seed = ctx.scalars
        need_x, need_bias, need_a, need_b = ctx.needs_input_grad[:4]
        dx = dA = dB = dbias = None
        if need_x or need_a or need_b:
            weight = _dequantize(ctx.meta, qtensors, x.dtype, ctx.backend) if need_x else None
            if ctx.traced:
                dx, dA, dB = lora_linear_bwd(
                    dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, ctx.backend, need_x, need_a, need_b,
                )
                dx, dA, dB = (dx if need_x else None), (dA if need_a else None), (dB if need_b else None)
            else:
                dx, dA, dB = backward_core(
                    dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, ctx.backend, need_x, need_a, need_b,
                )
        if need_bias:
            dbias = rows(dy).sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(ctx.bias_dtype)
        return (dx, dbias, dA, dB, None, None, None, None, None) + (None,) * len(qtensors)


class QuantLinearFunction(torch.autograd.Function):
    """y = x dequant(Wq)ᵀ + bias with no LoRA term (a quantized layer no adapter targets):
    the dense weight is rebuilt in the backward for dx = dY W instead of being saved."""

    @staticmethod
    def forward(ctx, x, bias, backend, meta, *qtensors):
        ctx.save_for_backward(*qtensors)
        ctx.backend, ctx.meta = backend, meta
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.nn.functional.linear(x, _dequantize(meta, qtensors, x.dtype, backend), bias)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_ORDER_ERROR)
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = dy @ _dequantize(ctx.meta, ctx.saved_tensors, dy.dtype, ctx.backend)
        if ctx.needs_input_grad[1]:
            dbias = rows(dy).sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(ctx.bias_dtype)
        return (dx, dbias, None, None) + (None,) * len(ctx.saved_tensors)


def quantized_linear(
    x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """x [..., K] -> x dequant(qweight)ᵀ + bias [..., N] in x's dtype (bias cast to it).

    The dequantised weight lives only inside the call (forward, and again in backward)."""
    if qweight.device != x.device:
        raise ValueError(f"the quantized weight is on {qweight.device}, x on {x.device}")
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"x's last dim {x.shape[-1]} != the weight's in_features {qweight.shape[1]} "
                         f"(x {tuple(x.shape)}, weight {qweight.shape})")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    backend = resolve_backend(backend, x.device, x.dtype)
    return QuantLinearFunction.apply(x, bias, backend, _meta(qweight), *_tensors(qweight))


def lora_linear_quantized(
    x: torch.Tensor,
    qweight: QuantizedWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    *,
    dropout_p: float | torch.Tensor = 0.0,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """QLoRA linear: ``x dequant(qweight)ᵀ + bias + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: [..., K] float32 / float16 / bfloat16; the weight is dequantised to x's dtype
            (the autocast dtype under torch.autocast).
        qweight: the quantized base weight, shape (N, K), on x's device.
        bias: [N] in x's dtype, or None. lora_A [r, K], lora_B [N, r]: x's dtype or float32.
        scaling, dropout_p, seed, backend: as for `lorakern.lora_linear`.
    Returns:
        y: [..., N] in x's dtype.

    Example:
        >>> import torch
        >>> from lorakern.quant import quantize_weight
        >>> from lorakern.qops import lora_linear_quantized
        >>> qw = quantize_weight(torch.randn(6, 64), "nf4")
        >>> lora_linear_quantized(torch.randn(4, 64), qw, None, torch.randn(2, 64), torch.randn(6, 2), 0.5).shape
        torch.Size([4, 6])
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a lorakern.quant.QuantizedWeight, got {type(qweight).__name__}")
    check_devices(x, None, bias, lora_A, lora_B)
    if isinstance(x, torch.Tensor) and qweight.device != x.device:
        raise ValueError(f"the quantized weight is on {qweight.device}, x on {x.device}")
    x, _, bias, lora_A, lora_B = autocast_inputs(x, None, bias, lora_A, lora_B)
    if isinstance(x, torch.Tensor) and isinstance(bias, torch.Tensor) and bias.dtype != x.dtype and x.is_floating_point():
        bias = bias.to(x.dtype)  # bitsandbytes casts the bias to the compute dtype too
    # Shapes and dtypes checked as for a dense weight of qweight's shape (a meta tensor: no memory).
    dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float32
    check_inputs(x, torch.empty(qweight.shape, dtype=dtype, device="meta"), bias, lora_A, lora_B, scaling, dropout_p, seed)
    backend = resolve_backend(backend, x.device, x.dtype)
    meta, qtensors = _meta(qweight), _tensors(qweight)
    if torch.compiler.is_compiling():
        scaling, dropout_p, seed = scalar_tensors(scaling, dropout_p, seed)
        return QuantLoraLinearFunction.apply(x, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, meta, *qtensors)
    scaling, dropout_p, seed = scalar_values(scaling, dropout_p, seed)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B)):
        return _forward_eager(x, meta, qtensors, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)[0]
    return QuantLoraLinearFunction.apply(x, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, meta, *qtensors)
