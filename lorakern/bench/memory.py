"""Saved-activation bytes and peak memory of a training forward/backward.

Saved activations are counted with `torch.autograd.graph.saved_tensors_hooks`: every
tensor autograd keeps for backward during the forward goes through the pack hook; the
bytes of the distinct storages behind them are summed, leaving out the module's
parameters (weights are not activations). Peak memory is CUDA's allocator peak above
what was allocated before the forward (not available on CPU: reported as None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class SavedBytes:
    """Context manager: `.bytes` = distinct non-parameter storages saved for backward inside it."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self._exclude:
            self._seen.setdefault(ptr, storage.nbytes())
        return t  # the hook keeps t alive, so no pointer is reused while counting

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_activation_bytes(forward: Callable[[], torch.Tensor], params: Iterable[torch.Tensor]) -> int:
    """Bytes of the activations autograd saves during forward() (parameters excluded)."""
    with SavedBytes(exclude=params) as counter:
        out = forward()
    del out
    return counter.bytes


def module_memory(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, device: torch.device) -> tuple[int, int | None]:
    """(saved-activation bytes of module(x), CUDA peak of a forward + backward with dy, None on
    CPU); the module's parameters and buffers (quantized weights) do not count; x.grad reset."""
    params = list(module.parameters()) + list(module.buffers())
    saved = saved_activation_bytes(lambda: module(x), params)
    peak = peak_bytes(lambda: module(x).backward(dy), device)
    x.grad = None
    return saved, peak


def peak_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """CUDA allocator peak during step() above the memory allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
