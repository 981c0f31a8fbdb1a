"""Kernel launches with less host time.

`kernel[grid](**args)` goes through Triton's launch path on every call: the autotuner's
key and keyword merging, the binder, a cache key that formats the options as a string,
launch hooks, then the compiled kernel's C launcher. On the lent H200 (a VM whose every
driver call is slow) that path cost ~65 µs of host time per launch of the forward GEMM
(decode call 144 µs on the host, base 41 µs; benchmarks/NOTES.md, 2026-11-30), more
than the kernel itself at decode sizes.

`launch` takes that path once per specialisation and then calls the compiled kernel's
launcher directly. The specialisation is the one Triton itself computes (its binder:
dtypes, 16-byte alignment of pointers and integers, integers equal to 1, constexpr
values), so a cached kernel is reused exactly when Triton would reuse it. For an
autotuned kernel the autotuner runs the first call of each of its keys, and the
chosen config's meta-parameters are bound with the arguments afterwards.

The direct path is used only where it was checked (Triton 3.6 on CUDA, no launch hooks
set, kernels compiled rather than interpreted, not while torch.compile traces); every
other call takes `kernel[grid](**args)` unchanged. LORAKERN_FAST_LAUNCH=0 turns it off.
"""

from __future__ import annotations

import warnings

import torch
import triton

from .. import settings
from .common import interpreting

# Triton versions whose internals (JITFunction.device_caches' binder, CompiledKernel.run's
# argument order) the direct path was written against and run on.
_CHECKED_TRITON = ("3.6.",)


def _direct_supported() -> bool:
    if interpreting() or not settings.fast_launch:
        return False
    if not triton.__version__.startswith(_CHECKED_TRITON):
        return False
    from triton.runtime.jit import JITFunction

    return hasattr(JITFunction, "create_binder")


_DIRECT = _direct_supported()

# (kernel id, device, specialisation) -> CompiledKernel; (autotuner id, its key) -> Config.
_compiled: dict[tuple, object] = {}
_tuned: dict[tuple, object] = {}


def direct_enabled() -> bool:
    """Whether eager launches take the direct path (see the module docstring)."""
    return _DIRECT


try:  # imported once, not on every launch (triton.knobs: Triton >= 3.4)
    from triton import knobs as _knobs
except ImportError:  # older Triton: never _DIRECT (not a checked version)
    _knobs = None


def _hooks_set() -> bool:
    return _knobs.runtime.launch_enter_hook is not None or _knobs.runtime.launch_exit_hook is not None


def launch(kernel, grid, args: dict) -> None:
    """Launch `kernel` (a triton.jit function or a triton.autotune of one) on `grid` (a
    tuple, or a function of the bound arguments) with `args`: every argument by name,
    except the meta-parameters an autotuner chooses. Same effect as `kernel[grid](**args)`.
    """
    if not _DIRECT or not isinstance(kernel, (triton.JITFunction, triton.runtime.Autotuner)) or _hooks_set():
        kernel[grid](**args)
        return
    if isinstance(kernel, triton.runtime.Autotuner):
        # The autotuner's own key: its key arguments and every tensor's dtype.
        tkey = (id(kernel), *(args[k] for k in kernel.keys),
                *(v.dtype for v in args.values() if isinstance(v, torch.Tensor)))
        config = _tuned.get(tkey)
        if config is None or not isinstance(kernel.fn, triton.JITFunction):
            kernel[grid](**args)  # the autotuner times its configs (once per key) and launches
            _tuned[tkey] = kernel.best_config
            return
        args = {**args, **config.all_kwargs()}
        kernel = kernel.fn
    device = torch.cuda.current_device()
    try:
        bound, specialization, options = kernel.device_caches[device][4](**args)  # Triton's binder
        key = (id(kernel), device, tuple(specialization), tuple(options.items()))
    except Exception as exc:  # Triton's internals differ from what was checked
        _disable(exc)
        kernel[grid](**args)
        return
    compiled = _compiled.get(key)
    if compiled is None:  # first call of this specialisation: Triton compiles (or finds) and launches
        compiled = kernel[grid](**args)
        if compiled is not None and getattr(compiled, "function", None) is not None:
            _compiled[key] = compiled
        return
    if callable(grid):
        grid = grid(bound)
    compiled.run(
        grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
        torch._C._cuda_getCurrentRawStream(device),
        compiled.function, compiled.packed_metadata, None, None, None, *bound.values(),
    )


def _disable(exc: Exception) -> None:
    global _DIRECT
    _DIRECT = False
    warnings.warn(f"lorakern: direct kernel launches turned off ({type(exc).__name__}: {exc}); "
                  "launching through Triton's own path from now on", RuntimeWarning, stacklevel=3)


def clear() -> None:
    """Forget the cached kernels and autotuner choices (tests)."""
    _compiled.clear()
    _tuned.clear()
