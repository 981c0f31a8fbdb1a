"""Helpers for LoRA models sharded with PyTorch's own engines (FSDP2, tensor parallel).

lorakern has no distributed code of its own: DDP and `torch.distributed.fsdp.fully_shard`
(FSDP2) work on a LoRA-injected model as on any model. What needs care is reading
parameters back out of a sharded model: an FSDP2 parameter is a `DTensor` whose local
piece is one rank's shard, so saving it as is would write a shard (or fail). These
helpers turn DTensors into full tensors; gathering is a collective, so every rank of the
mesh must call them, in the same order.
"""

from __future__ import annotations

import torch


def _dtensor_type() -> type | None:
    """torch's DTensor class, or None when torch.distributed is unavailable."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor  # torch >= 2.5
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor import DTensor
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (e.g. an FSDP2-sharded parameter)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` as a plain, full tensor: a DTensor is gathered from every rank of its mesh
    (a collective: all ranks must call), anything else is returned unchanged.

    Shapes: a DTensor of global shape [*S] (local shard [*s]) -> a torch.Tensor [*S].
    """
    if is_sharded(t):
        return t.full_tensor()
    return t


def gather_full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: full_tensor(t)} for a state dict that may hold DTensors, in the dict's order
    (a collective when any tensor is sharded: call on every rank with the same keys).

    Example:
        >>> import torch
        >>> gather_full_tensors({"w": torch.ones(2)})["w"].shape
        torch.Size([2])
    """
    return {name: full_tensor(t) for name, t in tensors.items()}
