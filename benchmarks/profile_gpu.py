"""Where the time of lorakern's LoRA linear goes on a GPU: kernel tables from torch.profiler.

    python benchmarks/profile_gpu.py [OUT_FILE]

Sections (each printed as soon as it is done, so a cut run keeps what it finished):
  0. host µs per call of every provider (decode; fwd+bwd at 4096x1024, M = 8192),
     lorakern with and without the direct launch path;
  1. fwd+bwd at M = 8192, bf16, r = 16, fp32 adapters (the bench's headline rows):
     per-kernel CUDA time over 5 steps, lorakern vs the frozen base layer;
  2. decode at M = 16: host time per call (what do_bench sees when kernels are tiny)
     and the host-side op table; then the same call captured in a CUDA graph (host
     time out: the kernels' own cost, base / PEFT / lorakern);
  3. one LoraLinear under torch.compile (inductor) vs eager, fwd+bwd at M = 4096.
Nothing here is a test; it is the measuring tool behind benchmarks/NOTES.md.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lorakern.bench.providers import Weights, build

OUT = open(sys.argv[1], "w") if len(sys.argv) > 1 else sys.stdout


def say(text: str = "") -> None:
    print(text, file=OUT, flush=True)
    if OUT is not sys.stdout:
        print(text, flush=True)


def fwd_bwd(module, x, dy):
    y = module(x)
    y.backward(dy)


def kernel_table(fn, steps: int = 5, rows: int = 14, sort: str = "self_cuda_time_total") -> str:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)


def section_fwd_bwd() -> None:
    for K, N in ((4096, 1024), (4096, 4096)):
        w = Weights.random(K, N, 16, torch.bfloat16, torch.device("cuda"))
        x = torch.randn(8192, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(8192, N, device="cuda", dtype=torch.bfloat16)
        for name in ("base", "lorakern"):
            module = build(name, w, 0.0)
            say(f"\n=== fwd+bwd {name} K={K} N={N} M=8192 bf16 r=16 (5 steps) ===")
            say(kernel_table(lambda: fwd_bwd(module, x, dy)))
            del module


def _host_us(fn, calls: int = 200) -> float:
    """Host time per call (µs): wall clock over `calls` calls, no synchronisation inside,
    so it is the launch cost wherever the GPU keeps up (decode, small layers)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def section_host() -> None:
    """Host µs per call of every provider: decode (4096², M = 16) and fwd+bwd (4096x1024,
    M = 8192, where the H200's kernels take ~0.2 ms), lorakern with the direct launch
    path (kernels.launch) on and off."""
    from lorakern.kernels import launch

    cases = (("decode", 4096, 4096, 16), ("fwd+bwd", 4096, 1024, 8192))
    for mode, K, N, M in cases:
        w = Weights.random(K, N, 16, torch.bfloat16, torch.device("cuda"))
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "decode")
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        row = []
        for name in ("base", "eager", "addmm", "peft", "lorakern", "lorakern-triton-launch"):
            module = build(name.split("-")[0], w, 0.0)
            if name == "lorakern-triton-launch":
                launch._DIRECT = False
            try:
                if mode == "decode":
                    module.eval()
                    with torch.inference_mode():
                        us = _host_us(lambda: module(x))
                else:
                    us = _host_us(lambda: fwd_bwd(module, x, dy), calls=50)
            finally:
                launch._DIRECT = launch._direct_supported()
            row.append(f"{name} {us:.1f}")
        say(f"=== host us/call {mode} {K}x{N} M={M}: " + ", ".join(row) + " ===")


def section_decode() -> None:
    w = Weights.random(4096, 4096, 16, torch.bfloat16, torch.device("cuda"))
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    for name in ("base", "lorakern"):
        module = build(name, w, 0.0).eval()
        with torch.inference_mode():
            for _ in range(20):
                module(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(200):
                module(x)
            host = (time.perf_counter() - start) / 200 * 1e6
            torch.cuda.synchronize()
            total = (time.perf_counter() - start) / 200 * 1e6
            say(f"\n=== decode {name} 4096x4096 M=16: host {host:.1f} us/call, with sync {total:.1f} us/call ===")
            say(kernel_table(lambda: module(x), steps=20, rows=18, sort="self_cpu_time_total"))


def section_decode_graphs() -> None:
    """Decode M = 16 with the call captured in a CUDA graph (torch.cuda.graph), so host
    time is out: what each provider's kernels cost, and what "decode <= 1.10x base"
    needs once the launches are graphed."""
    from triton.testing import do_bench

    for K, N in ((4096, 4096), (4096, 1024)):
        w = Weights.random(K, N, 16, torch.bfloat16, torch.device("cuda"))
        x = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
        times = {}
        for name in ("base", "peft", "lorakern"):
            module = build(name, w, 0.0).eval()
            with torch.inference_mode():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up: autotuning, dispatch measurement
                    for _ in range(3):
                        module(x)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = module(x)
                graph.replay()
                torch.cuda.synchronize()
                err = (out.float() - module(x).float()).abs().max().item()
                times[name] = do_bench(graph.replay, warmup=25, rep=100) * 1e3
            say(f"decode graphed {name} {K}x{N} M=16: {times[name]:.1f} us (replay vs eager max diff {err:.2e})")
        say(f"decode graphed {K}x{N}: lorakern / base {times['lorakern'] / times['base']:.2f}, "
            f"lorakern / peft {times['lorakern'] / times['peft']:.2f}")


def section_compile() -> None:
    from triton.testing import do_bench

    w = Weights.random(4096, 4096, 16, torch.bfloat16, torch.device("cuda"))
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    eager = build("lorakern", w, 0.05)
    compiled = torch.compile(build("lorakern", w, 0.05))
    peft_c = torch.compile(build("peft", w, 0.05))
    for name, module in (("eager", eager), ("compiled", compiled), ("peft compiled", peft_c)):
        fn = lambda m=module: fwd_bwd(m, x, dy)  # noqa: E731
        fn()
        ms = do_bench(fn, warmup=25, rep=100)
        say(f"\n=== lorakern LoraLinear 4096x4096 M=4096 p=0.05 fwd+bwd, {name}: {ms:.3f} ms ===")
        say(kernel_table(fn, rows=16))


if __name__ == "__main__":
    say(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    for section in (section_host, section_fwd_bwd, section_decode, section_decode_graphs, section_compile):
        t0 = time.perf_counter()
        try:
            section()
        except Exception as exc:  # keep going: a later section may still answer its question
            say(f"\n!!! {section.__name__} failed: {type(exc).__name__}: {exc}")
        say(f"({section.__name__}: {time.perf_counter() - t0:.1f} s)")
