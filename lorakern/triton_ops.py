"""The Triton backend under torch.compile: `torch.library.triton_op`s the compiler traces.

`ops.lora_linear` takes this path when it is traced (torch.compile, export) or given
tensor subclasses, the backend is "triton" and the kernels are compiled (not
interpreted). Unlike the opaque `lorakern::lora_linear_fwd` custom op, the bodies
below are traced: each kernel launch (`wrap_triton`) becomes a node of the graph
Inductor compiles, next to the surrounding ops.

A traced body cannot read a tensor's value on the host, so the scalars reach the
kernels through device memory (kernels.common.DeviceScalars), made one of two ways:

    graph_scalars              without dropout, from a scaling already on x's device (a
                               placed ops.ScalarDict mirror, as LoraLinear passes it) or a
                               Python number: [s, -1, 1] and a zero seed built by ops in the
                               graph — no host op and no CPU input, so CUDA graphs
                               (torch.compile(mode="reduce-overhead")) can capture the call;
    lorakern::device_scalars   otherwise, opaque, on the host: validates scaling / dropout p,
                               draws the seed from torch's CPU generator when none is given
                               (the draw eager mode makes, so compiled and eager masks agree,
                               and activation checkpointing's recomputation gets the same
                               seed), and copies [s, p, 1/(1-p)] and the seed to x's device;
    lorakern::lora_linear_fwd_triton, lorakern::lora_linear_bwd_triton
                               the kernels, reading those values from memory.

So a graph with dropout on keeps a host op (CUDA graphs skip it); without dropout —
inference, decode, p = 0 training — it has none.

Without Triton's compiler (TRITON_INTERPRET=1) `wrap_triton` cannot trace a kernel, so
there `ops.lora_linear` takes the opaque custom op instead. The triton_ops also
run eagerly (the dispatcher calls the body with plain tensors): that is how the CPU
tests check their numerics in the interpreter.
"""

from typing import Optional

import torch

from lorakern import op_core
from lorakern.kernels import DeviceScalars, lora_linear_backward, lora_linear_forward
from lorakern.kernels.common import to_device_scalars


@torch.library.custom_op(
    "lorakern::device_scalars", mutates_args=(),
    schema="(Tensor scaling, Tensor dropout_p, Tensor? seed, Device device) -> (Tensor, Tensor)",
    tags=(torch.Tag.nondeterministic_seeded,),
)
def device_scalars(scaling, dropout_p, seed, device):
    """CPU scalars -> (values float32 [3] = (s, p or -1 when 0, 1/(1-p)), seed int64 [1]) on `device`.

    scaling, dropout_p: one-element CPU float tensors; seed: one-element int64 CPU tensor,
    or None to draw one (only when p > 0, as eager mode does).
    """
    mem = to_device_scalars(*op_core.scalar_values(scaling, dropout_p, seed), device)
    return mem.values, mem.seed


@device_scalars.register_fake
def _device_scalars_fake(scaling, dropout_p, seed, device):
    return torch.empty(3, dtype=torch.float32, device=device), torch.empty(1, dtype=torch.int64, device=device)


def _scalars(values: torch.Tensor, seed: torch.Tensor, has_dropout: bool):
    """(scaling, p, seed) arguments of the kernel launchers: one DeviceScalars, with p and
    seed by value (no dropout) when the mask is off."""
    mem = DeviceScalars(values, seed, has_dropout)
    return (mem, mem, mem) if has_dropout else (mem, 0.0, 0)


@torch.library.triton_op("lorakern::lora_linear_fwd_triton", mutates_args=())
def lora_linear_fwd_triton(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    values: torch.Tensor,
    seed: torch.Tensor,
    has_dropout: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (y [..., N] x's dtype, S [M, r] fp32), values / seed from `device_scalars`.
    has_dropout (static) selects the masked kernels; a p of 0 then keeps every element."""
    # op_core.forward_core's steps, written out: torch finds the kernels for its compile-cache
    # key by reading this body for calls by name (lora_linear_forward), and cannot follow
    # forward_core's `implementation(backend).lora_linear_forward` (tests/test_triton_ops.py).
    scaling, p, seed_arg = _scalars(values, seed, has_dropout)
    lead = x.shape[:-1]
    with op_core.autocast_off(x):
        y, S = lora_linear_forward(op_core.rows(x), weight, bias, lora_A, lora_B, scaling, p, seed_arg)
    return torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1])), S


@torch.library.triton_op("lorakern::lora_linear_bwd_triton", mutates_args=())
def lora_linear_bwd_triton(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor,
    values: torch.Tensor,
    seed: torch.Tensor,
    has_dropout: bool,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA backward: (dx [..., K], dA [r, K], dB [N, r]); one not needed is an empty [0]."""
    # Written out for the same reason as the forward (lora_linear_backward called by name).
    scaling, p, seed_arg = _scalars(values, seed, has_dropout)
    with op_core.autocast_off(dy):
        dx, dA, dB = lora_linear_backward(
            op_core.rows(dy), op_core.rows(x), weight, lora_A, lora_B, S,
            scaling, p, seed_arg, (need_x, need_a, need_b),
        )
    if dx is not None:
        dx = torch.ops.aten._unsafe_view(dx, x.shape)
    return op_core.bwd_outputs(dy, lora_A, lora_B, dx, dA, dB)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, values, seed, has_dropout = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], values, seed)
    ctx.has_dropout = has_dropout
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dS):
    x, weight, lora_A, lora_B, S, values, seed = ctx.saved_tensors
    grads = op_core.op_grads(ctx, dy, x, weight, lora_linear_bwd_triton,
                             dy, x, weight, lora_A, lora_B, S, values, seed, ctx.has_dropout)
    return (*grads, None, None, None)


lora_linear_fwd_triton.register_autograd(_backward, setup_context=_setup_context)


def graph_scalars(scaling, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Without dropout: (values float32 [3] = (s, -1, 1), seed int64 [1] = 0) on `device`, built
    by ops the graph holds from `scaling`, a one-element tensor on `device` or a Python number
    (rounded to fp32 as `to_device_scalars` rounds). Its value is not read, so not checked
    here: ScalarDict checks on assignment, lora_linear checks numbers."""
    if isinstance(scaling, torch.Tensor):
        s = scaling.reshape(1).to(torch.float32)
    else:
        s = torch.full((1,), scaling, dtype=torch.float32, device=device)
    one = torch.ones_like(s)
    return torch.cat([s, -one, one]), torch.zeros(1, dtype=torch.int64, device=device)


def lora_linear_traced(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, has_dropout: bool) -> torch.Tensor:
    """y [..., N] through the traced ops; scaling / dropout_p / seed as `ops.lora_linear` takes
    them (checked). has_dropout: dropout_p is a tensor or a positive number."""
    elsewhere = isinstance(scaling, torch.Tensor) and scaling.device != x.device  # a CPU mirror
    if has_dropout or elsewhere:
        values, seed_d = device_scalars(*op_core.scalar_tensors(scaling, dropout_p, seed), x.device)
    else:
        values, seed_d = graph_scalars(scaling, x.device)
    return lora_linear_fwd_triton(x, weight, bias, lora_A, lora_B, values, seed_d, has_dropout)[0]
