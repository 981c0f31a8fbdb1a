"""Where a small CPU layer's time goes, cold caches, next to PEFT's: the CPU target's worst row.

    python benchmarks/cpu_host_time.py [--kn 512x128] [--tokens 64] [--seconds 1.5]

At the suite's smallest shapes (512×128, M = 64, fp32, one thread) a LoRA layer's fwd+bwd is
mostly host time, and with the suite's cache flush before each call (64 MiB rewritten) that
host time is set by how much code and data a call touches, not by how many calls it makes.
This times, with the suite's own interleaved timer and flush (`time_cpu_interleaved`) but
longer per provider than the suite does:

    base        the frozen nn.Linear
    peft        PEFT's LoRA layer (the suite's provider)
    lorakern    LoraLinear (its eager fast path)
    forward     LoraLinear.forward (no nn.Module.__call__)
    apply       ops.apply_function (the autograd.Function through the C apply)
    py-apply    LoraLinearFunction.apply (torch's Python wrapper included)

for the forward alone and for fwd+bwd, and prints lorakern / PEFT. Not a test; compare runs
made back to back (a shared machine moves them by 5–10 %). Numbers go to benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from lorakern.bench.providers import Weights, build, trainable
from lorakern.bench.timing import TimerSpec, time_cpu_interleaved
from lorakern.ops import LoraLinearFunction, apply_function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kn", default="512x128", help="K x N of the layer")
    parser.add_argument("--tokens", type=int, default=64, help="M, the rows of x")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=1.5, help="timed seconds per provider and mode")
    args = parser.parse_args()
    K, N = (int(v) for v in args.kn.split("x"))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = Weights.random(K, N, args.rank, torch.float32, torch.device("cpu"))
    modules = {name: build(name, weights, 0.0) for name in ("base", "peft", "lorakern")}
    layer = modules["lorakern"]
    W = layer.base_layer.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    calls = {
        **modules,
        "forward": layer.forward,
        "apply": lambda x: apply_function(x, W, None, A, B, s, 0.0, 0, "reference"),
        "py-apply": lambda x: LoraLinearFunction.apply(x, W, None, A, B, s, 0.0, 0, "reference"),
    }
    xs = [torch.randn(args.tokens, K, requires_grad=True) for _ in range(8)]
    dys = [torch.randn(args.tokens, N) for _ in range(8)]
    order = itertools.cycle(range(8))
    spec = TimerSpec(warmup_ms=50, rep_ms=args.seconds * 1e3)
    layer_grads = xs + trainable(layer)
    grads = {name: xs + trainable(modules[name]) if name in modules else layer_grads for name in calls}
    for mode in ("fwd", "fwd+bwd"):
        if mode == "fwd":
            fns = {name: (lambda f: lambda: f(xs[next(order)]))(f) for name, f in calls.items()}
        else:
            fns = {name: (lambda f: lambda: (lambda i: f(xs[i]).backward(dys[i]))(next(order)))(f)
                   for name, f in calls.items()}
        times = time_cpu_interleaved(fns, spec, grads if mode == "fwd+bwd" else {})
        row = "  ".join(f"{name} {t.median_ms * 1e3:7.1f}" for name, t in times.items())
        print(f"{mode:8s} µs: {row}   lorakern / peft {times['lorakern'].median_ms / times['peft'].median_ms:.3f}")


if __name__ == "__main__":
    main()
