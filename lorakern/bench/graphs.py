"""Decode under CUDA graphs: each provider's decode step captured once, its replay timed (issue 11).

At decode sizes (M <= 16) an eager LoRA layer is mostly host work: Python, module hooks and
one launch per kernel, while the GPU reads W once. A serving stack takes that host work
away by capturing the step in a CUDA graph (vLLM's captured decode steps,
torch.compile(mode="reduce-overhead")) and replaying it; what is left is the kernels and the
gaps between them inside the graph. These rows measure that: what a LoRA provider costs over
the frozen base when neither pays for the host. Target (targets.py): lorakern's replay
<= 1.10x the graphed base's replay (bf16, r = 16, Llama-3-8B shapes, every decode M).

Per (K×N, r, decode M, provider), dropout 0, eval mode, torch.inference_mode, the standard
capture (`capture`):
  1. one static input x [M, K], fixed for the graph's life (a graph reads fixed addresses);
  2. WARMUP_CALLS calls on a side stream (wait_stream both ways), then synchronize: Triton
     compiles here, and lorakern's measured dispatch (lorakern.kernels.DISPATCH) times its
     candidates here, which it cannot do while the stream is capturing;
  3. `out = step(x)` captured in `torch.cuda.graph(g)`;
  4. `g.replay` timed with timing.time_fn (CUDA events via do_bench, L2 flushed before each
     repetition, so W comes from HBM as in the eager decode rows).
After the capture one replay's output is compared with the fp64 reference (`rel_err`): a
graph that replays fast but computes something else must not pass. A provider whose capture
or replay raises is recorded with `median_ms` None and `error` ("Type: first line"), and a
warning; the run goes on. CUDA only in the suite; the tests replace `capture` with the eager
call to run the bookkeeping on CPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from lorakern.bench.providers import Weights, build
from lorakern.bench.shapes import modes_for
from lorakern.bench.timing import TimerSpec, noisy_spread, spread, time_fn

# Calls before the capture: Triton's compile and lorakern's dispatch measurement happen in the first.
WARMUP_CALLS = 3


def wanted(device: torch.device, modes: Sequence[str]) -> bool:
    """Whether the suite adds decode-graph rows: CUDA runs that time decode."""
    return device.type == "cuda" and "decode" in modes


def decode_tokens(tokens: Sequence[int], modes: Sequence[str]) -> list[int]:
    """The suite's token counts that it times in decode mode (M <= DECODE_MAX_M)."""
    return [M for M in tokens if "decode" in modes_for(M, tuple(modes))]


def capture(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`step(x)` (a provider's module) captured once in a CUDA graph, in the caller's grad mode;
    returns the replay, which returns the graph's static output. `x` must stay alive, at the same
    address, while the replay is used."""
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            step(x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    torch.cuda.synchronize(x.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(x)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def describe_error(exc: BaseException) -> str:
    """"Type: first line" of `exc`; when it was raised while handling another (a failed capture's
    end hides the call that broke it), that one's too."""
    def line(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__

    cause = exc.__cause__ or exc.__context__
    return line(exc) + (f" (after {line(cause)})" if cause is not None else "")


def _graphed_row(module: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor | None, device: torch.device,
                 spec: TimerSpec) -> dict:
    """Capture, check (against `ref`, when given) and time one provider at one (shape, M), in
    inference mode: the row's timing fields and `rel_err`, and `error` ("Type: first line") with
    `error_stage` ("capture" or "replay"), both None when it ran."""
    stage = "capture"
    try:
        with torch.inference_mode():
            replay = capture(module, x)
            stage = "replay"
            out = replay()
            rel_err = None if ref is None else ((out.double() - ref).norm() / ref.norm()).item()
            t = time_fn(replay, device, spec)
    except Exception as exc:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"median_ms": None, "p20_ms": None, "p80_ms": None, "reps": None, "rel_err": None,
                "error": describe_error(exc), "error_stage": stage}
    return {"median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.reps, "rel_err": rel_err,
            "error": None, "error_stage": None}


def graph_rows(kn, tokens: Sequence[int], ranks, providers: Sequence[str], dtype: torch.dtype,
               device: torch.device, spec: TimerSpec, tick: Callable[[str], None] = lambda label: None,
               seed: int = 0, bias: bool = False, agree_rtol: float | None = None) -> tuple[list[dict], list[str]]:
    """One row per (K×N, r, M in `tokens`, provider): median / p20 / p80 ms of the graph's
    replay, `ratio_to_base` (over the graphed base's median at the same shape and M, None when
    the base has no time), `noisy`, `rel_err` of the replayed output against fp64 and `agrees`
    (rel_err <= agree_rtol; both None for the base, agrees None without a tolerance), `error` /
    `error_stage` (None when it ran). Returns (rows, warnings: one per failed provider and shape,
    one for noisy rows)."""
    limit = noisy_spread(device.type)
    rows, warnings = [], []
    for r, (K, N) in itertools.product(ranks, kn):
        torch.manual_seed(seed)
        w = Weights.random(K, N, r, dtype, device, bias=bias)
        modules = {name: build(name, w, 0.0).eval() for name in providers}
        for M in tokens:
            x = torch.randn(M, K, device=device, dtype=dtype)
            ref = w.reference(x)
            at_M = []
            for name, module in modules.items():
                timing = _graphed_row(module, x, None if name == "base" else ref, device, spec)
                at_M.append({
                    "provider": name, "K": K, "N": N, "M": M, "r": r, "dtype": str(dtype).removeprefix("torch."),
                    **timing,
                    "agrees": None if None in (timing["rel_err"], agree_rtol) else timing["rel_err"] <= agree_rtol,
                    "noisy": timing["median_ms"] is not None and spread(timing["p20_ms"], timing["p80_ms"]) > limit,
                })
                if timing["error"]:
                    warnings.append(f"decode under CUDA graphs: {name}'s {timing['error_stage']} failed at K={K} "
                                    f"N={N} M={M} r={r}: {timing['error']}; row kept without a time")
                tick(f"decode graph K={K} N={N} M={M} r={r} {name}")
            base_ms = next((d["median_ms"] for d in at_M if d["provider"] == "base"), None)
            for d in at_M:
                d["ratio_to_base"] = d["median_ms"] / base_ms if d["median_ms"] is not None and base_ms else None
            rows += at_M
            del x, ref
        del modules
    n_noisy = sum(row["noisy"] for row in rows)
    if n_noisy:
        warnings.append(f"{n_noisy} of {len(rows)} decode-graph rows are noisy (p80/p20 > {limit:g}, not "
                        "re-measured): marked * and left out of the target verdict")
    return rows, warnings


def count(kn, tokens: Sequence[int], ranks, providers: Sequence[str]) -> int:
    """How many rows `graph_rows` makes (for the progress bar)."""
    return len(kn) * len(tokens) * len(ranks) * len(providers)
