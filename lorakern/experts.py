"""LoRA on a mixture of experts without rebuilding the experts' weights (grouped path).

PEFT's target_parameters (and lorakern's reference path, lorakern/parameter.py) runs the
experts module with its parameter replaced by W + ΔW: every forward writes and reads a
new [E, out, in] weight (for Mixtral-8x7B's experts, GBs per layer) and backward keeps it.
Here the LoRA term is applied to each expert's own token rows instead, as the SGMV kernels
do for adapters (lorakern/kernels/sgmv.py), with the experts in place of adapters:

    y_e = x_e W_eᵀ + s·(x_e A_eᵀ) B_eᵀ        for the rows x_e routed to expert e

The rows are sorted by expert once; each projection is one grouped GEMM for the base
weight (transformers' `_grouped_linear`: torch's grouped_mm where it runs, its fallback
elsewhere) plus two thin grouped GEMMs for the shrink [S, r] and the expand. Same math as
W + ΔW, other rounding (tests compare with PEFT in fp64).

Applies to transformers 5's experts modules (the `use_experts_implementation` ones:
Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, ...) whose LoRA-wrapped parameters are the
up / gate_up and down projections, when every wrapper is active, unmerged and enabled
and the model is not split over devices by expert; `LoraParameter.grouped = False`
selects the reference path (PEFT's numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A projection's LoRA terms: (A_e [E, r, in], B_e [E, out, r], scaling) per active adapter.
Terms = list[tuple[torch.Tensor, torch.Tensor, float]]
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def grouped_linear():
    """transformers' grouped linear (x [S, in], W [E, out, in] or [E, in, out], offsets), or None."""
    try:
        from transformers.integrations.moe import _grouped_linear
    except ImportError:
        return None
    return _grouped_linear


def supports(experts: nn.Module, parameters: list[str]) -> bool:
    """Whether `experts` is a transformers experts module this path reproduces, with LoRA on
    `parameters` only among its projections."""
    needed = ("has_gate", "has_bias", "is_transposed", "num_experts", "_apply_gate")
    if not all(hasattr(experts, a) for a in needed) or getattr(experts, "_is_expert_parallel", False):
        return False
    if not set(parameters) <= set(PROJECTIONS) or grouped_linear() is None:
        return False
    return all(isinstance(getattr(experts, p, None), nn.Parameter) and getattr(experts, p).dim() == 3 for p in parameters)


def _grouped_operands(A_e: torch.Tensor, B_e: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A_e [E, r, in], B_e [E, out, r] as grouped_mm takes them: in `dtype`, dense (B_e is
    a permuted view), the rank zero-padded to a multiple of 8 (grouped_mm wants 16-byte
    strides; zero rows of A and columns of B add exact zeros)."""
    pad = -A_e.shape[1] % 8
    if pad:
        A_e, B_e = F.pad(A_e, (0, 0, 0, pad)), F.pad(B_e, (0, pad))
    return A_e.to(dtype).contiguous(), B_e.to(dtype).contiguous()


def forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    terms: dict[str, Terms],
) -> torch.Tensor:
    """The experts block's output [tokens, hidden] with each projection's LoRA terms.

    hidden_states [tokens, hidden]; top_k_index [tokens, k] (expert of each choice);
    top_k_weights [tokens, k] (routing weight of each choice); terms: {parameter name:
    Terms} for the LoRA-wrapped projections. Differentiable in hidden_states, the
    routing weights and every A_e / B_e.
    """
    linear = grouped_linear()
    tokens, k = top_k_index.shape
    hidden = hidden_states.shape[-1]
    choice_expert = top_k_index.reshape(-1)
    order = torch.argsort(choice_expert, stable=True)  # the (token, choice) pairs grouped by expert
    rows = hidden_states[order // k]
    # a scatter, not bincount: bincount reads its maximum on the host (a sync on CUDA)
    per_expert = torch.zeros(experts.num_experts, dtype=torch.int64, device=choice_expert.device)
    per_expert.scatter_add_(0, choice_expert, torch.ones_like(choice_expert))
    offsets = torch.cumsum(per_expert, 0).to(torch.int32)
    sorted_expert = choice_expert[order]

    def project(x: torch.Tensor, name: str) -> torch.Tensor:
        bias = getattr(experts, f"{name}_bias", None) if experts.has_bias else None
        out = linear(x, getattr(experts, name), offsets, bias=None if bias is None else bias[sorted_expert],
                     is_transposed=experts.is_transposed)
        for A_e, B_e, s in terms.get(name, ()):
            A_e, B_e = _grouped_operands(A_e, B_e, x.dtype)
            shrunk = linear(x, A_e, offsets)  # [S, r]
            out = out + s * linear(shrunk, B_e, offsets)
        return out

    up = project(rows, "gate_up_proj" if experts.has_gate else "up_proj")
    act = experts._apply_gate(up) if experts.has_gate else experts.act_fn(up)
    down = project(act, "down_proj")
    if getattr(experts, "has_post_expert_norm", False):
        down = experts.post_expert_norm(down)
    weighted = down * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    unsorted = torch.empty_like(weighted).index_copy_(0, order, weighted)
    # the k choices of a token summed as transformers' grouped path sums them
    return unsorted.view(tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)
