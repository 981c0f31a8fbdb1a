"""`lorakern` console script: `info`, `check`, `bench`, `merge`, `inspect`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import torch


def _info(args: argparse.Namespace) -> int:
    from lorakern.bench.machine import machine_info, pick_device

    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    info = machine_info(device, dtype)
    rows = [
        ("device", info["device"]),
        ("card", info["card"]),
        ("driver", info["driver"] or ("–" if device.type == "cpu" else "unknown (no nvidia-smi)")),
        ("CUDA runtime", info["cuda_runtime"] or "– (CPU build of torch)"),
        ("torch", info["torch"]),
        ("Triton", info["triton"] or "not installed"),
        ("Triton interpreter", "on (TRITON_INTERPRET=1)" if info["triton_interpret"] else "off"),
        ("Python", info["python"]),
        ("CPU threads", str(info["cpu_threads"])),
        ("lorakern", f"{info['lorakern']} ({info['commit'] or 'not a git checkout'})"),
        (f"backend 'auto' ({info['auto_backend_dtype']})", f"{info['auto_backend']}: {info['auto_backend_reason']}"),
        ("CPU dropout masks", info["cpu_mask_generator"]),
    ]
    if device.type == "cuda":
        rows.insert(3, ("GPU memory", f"{info['gpu_memory_gib']} GiB, {info['sm_count']} SMs, sm_{info['compute_capability'].replace('.', '')}"))
    for key, value in info["env"].items():
        rows.append((key, value))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _check(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # On CPU the kernels run in Triton's interpreter, which must be chosen before
        # triton is first imported; importing lorakern may already have imported it
        # (through torch), so run the check in a fresh interpreter with the switch set.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, "-m", "lorakern.cli", "check"], env=env).returncode
    if torch.cuda.is_available() and "LORAKERN_AUTOTUNE" not in os.environ:
        # The check is about numbers, not speed: one GEMM tile per kernel. With autotuning
        # every case compiles and times 9 tiles per kernel variant, and the first fp32 case
        # alone ran past 45 s on an H200. The switch is read when the kernels are
        # imported, hence the fresh interpreter.
        env = dict(os.environ, LORAKERN_AUTOTUNE="0")
        return subprocess.run([sys.executable, "-m", "lorakern.cli", "check"], env=env).returncode
    from lorakern.selfcheck import run_selfcheck

    return 0 if run_selfcheck(print_fn=print) else 1


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(",", " ").split())


def _bench(args: argparse.Namespace) -> int:
    from lorakern.bench.machine import pick_device
    from lorakern.bench.report import machine_line, targets_table, timing_table, write_results
    from lorakern.bench.shapes import parse_kn
    from lorakern.bench.suite import BenchConfig, run_suite

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = None if args.shapes in (None, "custom") else args.shapes
    overrides = {
        "dtype": getattr(torch, args.dtype) if args.dtype else None,
        "tokens": tuple(args.tokens) if args.tokens else None,
        "ranks": tuple(args.rank) if args.rank else None,
        "modes": tuple(args.modes) if args.modes else None,
        "providers": tuple(args.providers) if args.providers else None,
        "dropouts": tuple(args.dropout) if args.dropout else None,
        "bias": args.bias or None,
        "memory": False if args.no_memory else None,
        "e2e": False if args.no_e2e else None,
        "e2e_size": args.e2e_size,
        "e2e_compile": args.e2e_compile or None,
        "adapters": tuple(args.adapters) if args.adapters else None,
    }
    if args.adapters and args.suite != "mixed":
        raise SystemExit("--adapters is only used with --suite mixed")
    if args.shapes == "custom":
        if not args.kn:
            raise SystemExit("--shapes custom needs --kn KxN [KxN ...]")
        overrides["kn"] = tuple(parse_kn(s) for s in args.kn)
    elif args.kn:
        raise SystemExit("--kn is only used with --shapes custom")
    if args.providers:
        from lorakern.bench.providers import PROVIDERS
        from lorakern.bench.dora import DORA_PROVIDERS
        from lorakern.bench.mixed import MIXED_PROVIDERS
        from lorakern.bench.moe import MOE_PROVIDERS
        from lorakern.bench.qlora import QLORA_PROVIDERS

        allowed = {"qlora": QLORA_PROVIDERS, "dora": DORA_PROVIDERS, "mixed": MIXED_PROVIDERS,
                   "moe": MOE_PROVIDERS}.get(args.suite, PROVIDERS)
        wrong = [p for p in args.providers if p not in allowed]
        if wrong:
            raise SystemExit(f"--suite {args.suite} providers are {', '.join(allowed)}; got {', '.join(wrong)}")
    config = BenchConfig.for_device(device, preset, suite=args.suite, **overrides)
    if args.shapes == "custom":
        config = dataclasses.replace(config, preset="custom")
    if args.dry_run:
        print(config.as_dict())
        return 0
    print(f"lorakern bench: suite {config.suite}, preset {config.preset} on {device}, {str(config.dtype).removeprefix('torch.')}, "
          f"providers {', '.join(config.providers)}", file=sys.stderr)
    results = run_suite(config, progress=not args.quiet)
    print(machine_line(results))
    print(f"timer: {results['timer']}")
    print(timing_table(results))
    if results["targets"]:
        print()
        print(targets_table(results))
    if args.out:
        out = args.out.format(card=results["machine"]["card_slug"], date=results["started_utc"][:10])
        for path in write_results(results, out, plots=not args.no_plots):
            print(f"wrote {path}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lorakern.adapters import AdapterLoadError
    from lorakern.checkpoint_merge import MergeError, format_report, merge_checkpoint, plan_merge

    try:
        plan = plan_merge(args.base_dir, args.adapter_dir)
        if args.dry_run:
            print(f"checkpoint {args.base_dir}: {len(plan.checkpoint.shards)} shard(s), {len(plan.checkpoint.tensors)} tensors; "
                  f"the adapter fits: {len(plan.deltas)} tensor(s) to merge, {len(plan.replacements)} to replace whole")
            print(f"would copy: {', '.join(plan.copies) or 'nothing'}")
            if plan.skipped:
                print(f"would not copy: {', '.join(plan.skipped)}")
            return 0
        report = merge_checkpoint(args.base_dir, args.adapter_dir, args.out_dir, force=args.force,
                                  progress=not args.quiet, plan=plan)
    except (MergeError, AdapterLoadError, FileNotFoundError) as exc:
        print(f"lorakern merge: error: {exc}", file=sys.stderr)
        print(f"lorakern merge: nothing was written to {args.out_dir}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from lorakern.adapters import AdapterLoadError
    from lorakern.checkpoint_merge import MergeError, format_inspect, inspect_adapter

    try:
        info = inspect_adapter(args.adapter_dir)
    except (MergeError, AdapterLoadError, FileNotFoundError) as exc:
        print(f"lorakern inspect: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lorakern.bench.cost import MODES
    from lorakern.bench.dora import DORA_PROVIDERS
    from lorakern.bench.mixed import MIXED_PROVIDERS
    from lorakern.bench.moe import MOE_PROVIDERS
    from lorakern.bench.providers import PROVIDERS
    from lorakern.bench.qlora import QLORA_PROVIDERS
    from lorakern.bench.shapes import PRESETS
    from lorakern.bench.suite import SUITES

    parser = argparse.ArgumentParser(prog="lorakern", description="Fused LoRA kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="device, card, driver, torch, Triton, and what backend 'auto' picks")
    info.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    info.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype for the backend choice")

    sub.add_parser("check", help="run the fused path against the reference and print the errors")

    bench = sub.add_parser(
        "bench", help="benchmark suite: base vs eager vs addmm vs PEFT vs lorakern (--suite qlora: 4-bit bases; "
        "--suite dora: DoRA; --suite mixed: many adapters in one batch; --suite moe: LoRA on expert parameters)",
        description="With no arguments: Llama-3-8B shapes in bf16 on a GPU; small shapes in fp32 on CPU "
        "(a few minutes either way). decode runs at M <= 16, fwd and fwd+bwd at M > 16. "
        "--suite qlora: a 4-bit (NF4, double quant) base instead, bf16 on both devices: "
        "bf16 base vs bitsandbytes Linear4bit vs PEFT QLoRA vs lorakern QLoRA, and the QLoRA end-to-end step. "
        "--suite dora: base vs PEFT's DoRA vs lorakern's DoRA (vs plain lorakern LoRA), same A, B and magnitude. "
        "--suite mixed: one adapter per batch row (1, 8, 64 adapters across the batch): base vs PEFT's mixed batch "
        "(adapter_names=) vs lorakern's per-adapter loop vs lorakern.lora_linear_mixed, inference forward "
        "(time, tokens/s, ratio to base) at decode batches M = 16-256 and a prefill. "
        "--suite moe: one Mixtral experts block (8 experts, top-2; --kn is hidden x intermediate): frozen vs PEFT's "
        "vs lorakern's LoRA on gate_up_proj / down_proj (target_parameters), same adapters, inference forward and "
        "fwd+bwd.",
    )
    bench.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    bench.add_argument("--suite", choices=SUITES, default="lora",
                       help="lora (default): dense base; qlora: 4-bit base (needs bitsandbytes for its bnb/PEFT rows); "
                       "dora: DoRA, PEFT's vs lorakern's; mixed: many adapters in one batch; "
                       "moe: LoRA on mixture-of-experts parameters (target_parameters)")
    bench.add_argument("--shapes", choices=sorted(PRESETS) + ["custom"],
                       help="; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()) + "; custom: --kn")
    bench.add_argument("--kn", nargs="+", metavar="KxN", help="projections for --shapes custom, e.g. 4096x1024")
    bench.add_argument("--tokens", nargs="+", type=int, metavar="M", help="token counts M (rows of x)")
    bench.add_argument("--rank", nargs="+", type=int, metavar="R", help="LoRA ranks")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="default bfloat16 on GPU, float32 on CPU (--suite qlora: bfloat16 on both)")
    bench.add_argument("--modes", nargs="+", choices=MODES)
    bench.add_argument("--providers", nargs="+",
                       choices=list(dict.fromkeys(PROVIDERS + QLORA_PROVIDERS + DORA_PROVIDERS + MIXED_PROVIDERS
                                                  + MOE_PROVIDERS)),
                       help=f"lora suite: {' '.join(PROVIDERS)}; qlora suite: {' '.join(QLORA_PROVIDERS)}; "
                       f"dora suite: {' '.join(DORA_PROVIDERS)}; mixed suite: {' '.join(MIXED_PROVIDERS)}; "
                       f"moe suite: {' '.join(MOE_PROVIDERS)}")
    bench.add_argument("--adapters", nargs="+", type=int, metavar="N",
                       help="--suite mixed: adapters across the batch, one row per adapter round-robin (default 1 8 64)")
    bench.add_argument("--dropout", nargs="+", type=float, metavar="P", help="dropout of the timed rows (default 0)")
    bench.add_argument("--bias", action="store_true", help="give the base layer a bias")
    bench.add_argument("--no-memory", action="store_true", help="skip saved-activation / peak memory rows")
    bench.add_argument("--no-e2e", action="store_true", help="skip the end-to-end Llama training step")
    bench.add_argument("--e2e-size", choices=["auto", "1b", "1b-2layer", "tiny", "micro"],
                       help="end-to-end model size (1b-2layer: the 1b widths and batch, 2 layers)")
    bench.add_argument("--e2e-compile", action="store_true",
                       help="also time both end-to-end models under torch.compile (inductor)")
    bench.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's)")
    bench.add_argument("--out", metavar="DIR", help="write results.json/.csv/.md and PNG plots here; {card} and "
                       "{date} are filled in, e.g. benchmarks/results/{card}-{date}")
    bench.add_argument("--no-plots", action="store_true")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")

    merge = sub.add_parser(
        "merge", help="merge a PEFT LoRA adapter into a local Hugging Face safetensors checkpoint, shard by shard",
        description="Writes BASE_DIR's checkpoint with the adapter merged in (W + scaling * B A, summed in fp32 "
        "and cast once to W's dtype; modules_to_save tensors replaced) to OUT_DIR: the same shard files, tensor "
        "order and model.safetensors.index.json, and every other top-level file of BASE_DIR (config, tokenizer) "
        "copied; other weight files (*.bin, *.pth, ...) and sub-folders are not copied. One tensor of the "
        "checkpoint is in memory at a time, beside the adapter. An adapter that does not fit the checkpoint "
        "(missing tensor, wrong shape, rank not the config's, DoRA / embedding LoRA / ...) is refused before "
        "anything is written; OUT_DIR is written as a temporary folder beside it and renamed at the end.",
    )
    merge.add_argument("base_dir", metavar="BASE_DIR", help="Hugging Face checkpoint folder (model.safetensors[.index.json])")
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged checkpoint (must not exist or be empty)")
    merge.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    merge.add_argument("--dry-run", action="store_true", help="check that the adapter fits, write nothing")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")

    inspect = sub.add_parser(
        "inspect", help="an adapter's modules: r, alpha, scaling, parameters and delta norm ||s*BA||_F",
    )
    inspect.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT adapter folder")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return _info(args)
    if args.command == "check":
        return _check(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "merge":
        return _merge(args)
    if args.command == "inspect":
        return _inspect(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
