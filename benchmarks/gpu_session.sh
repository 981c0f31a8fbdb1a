#!/usr/bin/env bash
# What a session that is lent a GPU runs there, one stage per device call (each call
# may run 10 minutes; a task has 15 minutes of device time in all, start-up and idle
# time included — check the device tool's `status`), in this order of value:
#
#   bash benchmarks/gpu_session.sh quick   # call 1 (~6 min): install, machine info,
#                                          # `lorakern check`, the headline shapes (Llama-3-8B
#                                          # projections) at M = 16 and 8192 + memory rows, in
#                                          # two bench runs so that a cut run loses half
#   bash benchmarks/gpu_session.sh speed   # one call (~6–9 min, every step under its own
#                                          # timeout, < 10 min in all): install, machine info, the
#                                          # CUDA tests of the newest speed changes (direct launches,
#                                          # small-M forward variants, merged / TMA kernels, decode
#                                          # under reduce-overhead CUDA graphs), the headline bench
#                                          # (as quick, no `check`; decode rows under CUDA graphs
#                                          # included), then the profile's decode and fwd+bwd sections
#   bash benchmarks/gpu_session.sh quick2  # call 2, right after (the machine stays warm 30 s):
#                                          # the CUDA-only tests (pytest -m cuda), the compiled
#                                          # end-to-end row (lorakern vs PEFT under torch.compile),
#                                          # then the Triton-backend training-stack tests
#   bash benchmarks/gpu_session.sh profile # benchmarks/profile_gpu.py: per-kernel tables of the
#                                          # headline fwd+bwd, decode host time, compiled vs eager
#   bash benchmarks/gpu_session.sh test    # install, machine info, op-level CUDA tests (large
#                                          # shapes, both GEMM variants), compile/autocast, check
#   bash benchmarks/gpu_session.sh bench   # the benchmark suite: headline shapes, memory
#   bash benchmarks/gpu_session.sh e2e     # the end-to-end ~1B Llama training step vs PEFT
#                                          # (its own call: autotuning its new shapes takes time)
#   bash benchmarks/gpu_session.sh test2   # per-kernel tests and the rest of the suite on CUDA
#   bash benchmarks/gpu_session.sh fused   # lorakern with the fused GEMMs forced
#                                          # (LORAKERN_FUSED_GEMM=1) vs base: what the measured
#                                          # dispatch turned down, and by how much
#   bash benchmarks/gpu_session.sh qlora   # one call (<= ~5 min): the QLoRA kernel tests on CUDA, then the QLoRA rows (issue 12) in
#                                          # bf16: bf16 base vs bitsandbytes Linear4bit vs PEFT QLoRA
#                                          # vs lorakern QLoRA (NF4 + double quant, r = 16) on the four
#                                          # Llama-3-8B projections at M = 1, 16, 8192 + memory rows (two
#                                          # runs of two shapes), then the QLoRA end-to-end step
#                                          # (1b-2layer Llama) vs PEFT + bitsandbytes
#   bash benchmarks/gpu_session.sh dora    # one call (<= ~2 min): the DoRA rows (issue 13) in bf16:
#                                          # base vs PEFT DoRA vs lorakern DoRA vs plain lorakern, r = 16,
#                                          # same A, B and magnitude, on the four Llama-3-8B projections
#                                          # at M = 16 and 8192 + memory rows (two runs of two shapes)
#   bash benchmarks/gpu_session.sh mixed   # one call (<= ~5 min): the SGMV kernels' tests on CUDA
#                                          # (all of tests/test_sgmv.py, <= 2 min), then the mixed-batch rows
#                                          # (issue 14) in bf16: base vs PEFT's mixed batch vs lorakern's
#                                          # per-adapter loop vs lorakern.lora_linear_mixed vs a LoraLinear
#                                          # with adapter_names=, 1 / 8 / 64 adapters of r = 16 across the
#                                          # batch, M = 16, 64, 256 (decode) and 2048 (prefill), on 4096x4096
#                                          # and 4096x14336 (two runs, one shape each)
#   bash benchmarks/gpu_session.sh moe     # one call (<= ~2 min): LoRA on expert parameters (issue 13
#                                          # item 2) in bf16: one Mixtral-8x7B experts block (hidden 4096,
#                                          # intermediate 14336, 8 experts, top-2) frozen vs PEFT's vs
#                                          # lorakern's target_parameters LoRA (r = 16, same adapters) at
#                                          # M = 16, 256, 2048, inference forward and fwd+bwd, + memory rows
#
# Everything lands in $OUT (the device tool's output folder; out/gpu when run by hand),
# at most 8 files and no deeper than $OUT/name, as the device tool brings back: bench
# folders are packed into .tgz files. Unpack into benchmarks/results/<card>-<date>/ and
# commit, then add the numbers to benchmarks/NOTES.md.
# The GPU images carry torch, Triton, peft, transformers and matplotlib: nothing is
# downloaded (pip --no-deps). tests/conftest.py turns GEMM autotuning off for the tests
# (LORAKERN_AUTOTUNE=0), and so does `lorakern check`; the benchmarks autotune.
# pytest runs under `timeout -s INT`: a run cut by its limit still prints its failures.
set -u
stage=${1:?usage: gpu_session.sh quick|speed|quick2|profile|test|bench|e2e|test2|fused|qlora|dora|mixed|moe}
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"

# The image's `pip` and /usr/local/bin scripts belong to another Python than the one
# holding torch (seen 2026-11-26: the `lorakern` script failed on "No module named
# torch"), so everything goes through that Python: `python -m ...`.
PY=${PY:-python}

machine_info() {  # -> $OUT/machine.txt: card, driver, commit, versions, backend choice
    {
        nvidia-smi
        echo "commit ${LORAKERN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
        "$PY" -m lorakern.cli info
        echo "--- install log"; tail -n 5 "$OUT/install-$stage.log"
    } > "$OUT/machine.txt" 2>&1
    rm -f "$OUT/install-$stage.log"
}
"$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install-$stage.log" 2>&1 || {
    echo "install failed"; tail -n 20 "$OUT/install-$stage.log"; exit 1; }

headline_bench() {  # -> $OUT/bench-a.tgz, bench-b.tgz: the four Llama-3-8B shapes, M = 16 and 8192
    # Two runs of two shapes each (the suite writes its files at the end; the second
    # run reuses the first one's compiled kernels from Triton's disk cache).
    for part in "a 4096x4096 4096x14336 200" "b 4096x1024 14336x4096 130"; do
        set -- $part
        timeout "$4" "$PY" -m lorakern.cli bench --shapes custom --kn "$2" "$3" --tokens 16 8192 --no-e2e \
            --out "$OUT/bench-$1" > "$OUT/bench-$1.log" 2>&1
        echo "bench rc=$?" >> "$OUT/bench-$1.log"
        mkdir -p "$OUT/bench-$1" && mv "$OUT/bench-$1.log" "$OUT/bench-$1/"
        tar czf "$OUT/bench-$1.tgz" -C "$OUT" "bench-$1" && rm -rf "$OUT/bench-$1"
    done
}

case "$stage" in
quick)
    machine_info
    timeout 90 "$PY" -m lorakern.cli check > "$OUT/check.txt" 2>&1
    echo "rc=$?" >> "$OUT/check.txt"
    headline_bench
    tail -n 3 "$OUT/check.txt"
    for part in a b; do tar xzf "$OUT/bench-$part.tgz" -O "bench-$part/bench-$part.log" | tail -n 25; done
    ;;
speed)
    machine_info
    [ "${SPEED_TESTS:-1}" = 0 ] || LORAKERN_AUTOTUNE=0 timeout -s INT -k 10 60 "$PY" -m pytest -q --tb=short --show-capture=no -p no:cacheprovider \
        tests/test_launch.py tests/test_kernels.py \
        -k "launch or (onepass and M16 and r16 and bf16)" > "$OUT/pytest-cuda-speed.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-speed.txt"
    # The merged-weight and TMA variants (new 2026-12-01, never run on a GPU, TMA never on
    # Triton 3.6): the kernels and the op with each forced, bf16 only (a few compiles).
    [ "${SPEED_TESTS:-1}" = 0 ] || LORAKERN_AUTOTUNE=0 timeout -s INT -k 10 45 "$PY" -m pytest -q --tb=short --show-capture=no \
        -p no:cacheprovider tests/test_merged_variant.py tests/test_kernels_op.py tests/test_tma_gemm.py \
        -k "(test_merged_variant and bf16) or every_gemm_variant or forced_tma or (test_tma_gemm and bf16 and M130 and r16)" \
        > "$OUT/pytest-cuda-merged.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-merged.txt"
    # The dS/dB pass's 2-D grid (split N, dS as partials dx / dA add on load; new 2026-12-01,
    # never run on a GPU): the whole backward through it (bf16, both dropouts) and its GPU blocks.
    [ "${SPEED_TESTS:-1}" = 0 ] || LORAKERN_AUTOTUNE=0 timeout -s INT -k 10 45 "$PY" -m pytest -q --tb=short --show-capture=no \
        -p no:cacheprovider tests/test_dsdb_split.py -k "(through_the_split_grid and bf16 and all) or gpu_split_config_in" \
        >> "$OUT/pytest-cuda-merged.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-merged.txt"
    # CUDA graphs under torch.compile(mode="reduce-overhead") at decode (issue 11 item 5, never
    # run on a GPU): no cudagraph skip, eager's numbers, a new scaling without recompiling. One
    # compile (the p = 0 training variant is in quick2's compile tests): the stage stays < 10 min.
    [ "${SPEED_TESTS:-1}" = 0 ] || LORAKERN_AUTOTUNE=0 timeout -s INT -k 10 60 "$PY" -m pytest -q --tb=short --show-capture=no \
        -p no:cacheprovider tests/test_compile.py -k "reduce_overhead and decode" >> "$OUT/pytest-cuda-merged.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-merged.txt"
    headline_bench
    timeout -s INT "${SPEED_PROFILE_S:-45}" "$PY" benchmarks/profile_gpu.py "$OUT/profile.txt" > /dev/null 2>&1
    echo "profile rc=$?"
    tail -n 8 "$OUT/pytest-cuda-speed.txt" 2>/dev/null
    grep "passed\|failed\|error\|rc=" "$OUT/pytest-cuda-merged.txt" 2>/dev/null
    for part in a b; do tar xzf "$OUT/bench-$part.tgz" -O "bench-$part/bench-$part.log" | grep -A12 "^| target"; done
    grep "===\|^decode graphed" "$OUT/profile.txt"
    ;;
quick2)
    # The tests CI never runs (requires_cuda, marked `cuda` by tests/conftest.py) first,
    # the traced-Triton (triton_op), compile and checkpoint ones before the rest.
    timeout -s INT -k 20 120 "$PY" -m pytest -q --tb=short --show-capture=no -p no:cacheprovider -m cuda \
        tests/test_triton_ops.py tests/test_compile.py tests/test_checkpoint.py > "$OUT/pytest-cuda-compile.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-compile.txt"
    timeout -s INT -k 20 80 "$PY" -m pytest -q --tb=short --show-capture=no -p no:cacheprovider -m cuda tests \
        --ignore=tests/test_triton_ops.py --ignore=tests/test_compile.py --ignore=tests/test_checkpoint.py \
        > "$OUT/pytest-cuda-only.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-only.txt"
    timeout 170 "$PY" -m lorakern.cli bench --shapes custom --kn 4096x4096 --tokens 16 --modes decode \
        --providers base lorakern peft --no-memory --e2e-size 1b-2layer --e2e-compile \
        --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
    echo "e2e rc=$?" >> "$OUT/e2e.log"
    mkdir -p "$OUT/e2e" && mv "$OUT/e2e.log" "$OUT/e2e/"
    tar czf "$OUT/e2e.tgz" -C "$OUT" e2e && rm -rf "$OUT/e2e"
    # The Triton-backend tests of the training stack, on CUDA tensors.
    timeout -s INT -k 20 120 "$PY" -m pytest -q --tb=short --show-capture=no -p no:cacheprovider \
        tests/test_compile.py tests/test_checkpoint.py tests/test_layer.py tests/test_op.py tests/test_errors.py \
        -k triton > "$OUT/pytest-cuda-triton.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-triton.txt"
    tail -n 12 "$OUT/pytest-cuda-compile.txt" "$OUT/pytest-cuda-only.txt"
    tar xzf "$OUT/e2e.tgz" -O e2e/e2e.log | tail -n 12
    grep -A7 "^| provider | model" <(tar xzf "$OUT/e2e.tgz" -O e2e/results.md 2>/dev/null)
    tail -n 8 "$OUT/pytest-cuda-triton.txt"
    ;;
profile)
    timeout -s INT 240 "$PY" benchmarks/profile_gpu.py "$OUT/profile.txt" > /dev/null 2>&1
    echo "profile rc=$?"
    grep "===\|!!!\|^(" "$OUT/profile.txt"
    ;;
test)
    machine_info
    timeout -s INT -k 20 400 "$PY" -m pytest -q --tb=short --show-capture=no -p no:cacheprovider \
        tests/test_kernels_op.py tests/test_compile.py tests/test_autocast.py tests/test_kernels_aot.py \
        > "$OUT/pytest-cuda-op.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-op.txt"
    timeout 120 "$PY" -m lorakern.cli check > "$OUT/check.txt" 2>&1
    echo "rc=$?" >> "$OUT/check.txt"
    tail -n 5 "$OUT/pytest-cuda-op.txt" "$OUT/check.txt"
    ;;
test2)
    timeout -s INT -k 20 380 "$PY" -m pytest -q --tb=short --show-capture=no -p no:cacheprovider tests/test_kernels.py \
        > "$OUT/pytest-cuda-kernels.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-kernels.txt"
    timeout -s INT -k 20 180 "$PY" -m pytest -q --tb=short --show-capture=no -p no:cacheprovider --ignore=tests/test_kernels.py \
        --ignore=tests/test_kernels_op.py --ignore=tests/test_compile.py --ignore=tests/test_autocast.py \
        --ignore=tests/test_kernels_aot.py > "$OUT/pytest-cuda-rest.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-rest.txt"
    tail -n 5 "$OUT"/pytest-cuda-kernels.txt "$OUT/pytest-cuda-rest.txt"
    ;;
bench)
    # The suite writes its files at the end: a run cut by the timeout leaves nothing,
    # so the end-to-end step (slow first call: autotuning) is a stage of its own.
    timeout 560 "$PY" -m lorakern.cli bench --no-e2e --out "$OUT/bench" > "$OUT/bench.log" 2>&1
    echo "bench rc=$?" >> "$OUT/bench.log"
    tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
    tail -n 40 "$OUT/bench.log"
    ;;
e2e)
    timeout 560 "$PY" -m lorakern.cli bench --shapes custom --kn 4096x4096 --tokens 1 --modes decode --no-memory \
        --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
    echo "e2e rc=$?" >> "$OUT/e2e.log"
    tar czf "$OUT/e2e.tgz" -C "$OUT" e2e && rm -rf "$OUT/e2e"
    tail -n 30 "$OUT/e2e.log"
    ;;
qlora)
    # The bitsandbytes / PEFT rows need bitsandbytes, which the image lacks: carry its wheel
    # (benchmarks/NOTES.md, 2026-12-01); without it they are skipped (the reason is in
    # results.md) and lorakern's rows still run.
    machine_info
    "$PY" -c "import peft; print('peft', peft.__version__)" >> "$OUT/machine.txt" 2>&1
    "$PY" -c "from lorakern.bench.qlora import bnb_available; import torch; print('bitsandbytes on cuda:', bnb_available(torch.device('cuda')))" \
        >> "$OUT/machine.txt" 2>&1
    # The QLoRA kernels on real hardware first (only the interpreter has run them): bit-equal
    # dequantisation (enable_fp_fusion=False), tl.gather under Triton 3.6. QLORA_TESTS=0 skips.
    [ "${QLORA_TESTS:-1}" = 0 ] || LORAKERN_AUTOTUNE=0 timeout -s INT -k 10 "${QLORA_TESTS_S:-90}" "$PY" -m pytest -q \
        --tb=short --show-capture=no -p no:cacheprovider -x tests/test_dequant_kernel.py tests/test_qgemm_kernel.py \
        tests/test_qlora.py -k "not bnb" > "$OUT/qlora-tests.log" 2>&1
    tail -n 5 "$OUT/qlora-tests.log"
    for part in "a 4096x4096 4096x14336 70" "b 4096x1024 14336x4096 55"; do
        set -- $part
        timeout "$4" "$PY" -m lorakern.cli bench --suite qlora --shapes custom --kn "$2" "$3" --tokens 1 16 8192 \
            --no-e2e --out "$OUT/qlora-$1" > "$OUT/qlora-$1.log" 2>&1
        echo "bench rc=$?" >> "$OUT/qlora-$1.log"
        mkdir -p "$OUT/qlora-$1" && mv "$OUT/qlora-$1.log" "$OUT/qlora-$1/"
        tar czf "$OUT/qlora-$1.tgz" -C "$OUT" "qlora-$1" && rm -rf "$OUT/qlora-$1"
    done
    # End to end: a token decode row to satisfy the suite, then the 2-layer 1B Llama, lorakern
    # QLoRA vs transformers BitsAndBytesConfig 4-bit + PEFT (the same weights, saved and reloaded).
    timeout 60 "$PY" -m lorakern.cli bench --suite qlora --shapes custom --kn 4096x4096 --tokens 16 --modes decode \
        --no-memory --e2e-size 1b-2layer --no-plots --out "$OUT/qlora-e2e" > "$OUT/qlora-e2e.log" 2>&1
    echo "e2e rc=$?" >> "$OUT/qlora-e2e.log"
    mkdir -p "$OUT/qlora-e2e" && mv "$OUT/qlora-e2e.log" "$OUT/qlora-e2e/"
    tar czf "$OUT/qlora-e2e.tgz" -C "$OUT" qlora-e2e && rm -rf "$OUT/qlora-e2e"
    tail -n 3 "$OUT/machine.txt"
    for part in a b e2e; do
        tar xzf "$OUT/qlora-$part.tgz" -O "qlora-$part/qlora-$part.log" | sed -n '/^| target/,/^$/p'
        tar xzf "$OUT/qlora-$part.tgz" -O "qlora-$part/qlora-$part.log" | tail -n 2
    done
    grep -A4 "^| provider | model" <(tar xzf "$OUT/qlora-e2e.tgz" -O qlora-e2e/results.md 2>/dev/null)
    ;;
dora)
    # PEFT's DoRA forms W + s·B A (N×K) every forward; lorakern's takes the row norms from W Aᵀ.
    machine_info
    "$PY" -c "import peft; print('peft', peft.__version__)" >> "$OUT/machine.txt" 2>&1
    for part in "a 4096x4096 4096x14336 65" "b 4096x1024 14336x4096 50"; do
        set -- $part
        timeout "$4" "$PY" -m lorakern.cli bench --suite dora --shapes custom --kn "$2" "$3" --tokens 16 8192 \
            --out "$OUT/dora-$1" > "$OUT/dora-$1.log" 2>&1
        echo "bench rc=$?" >> "$OUT/dora-$1.log"
        mkdir -p "$OUT/dora-$1" && mv "$OUT/dora-$1.log" "$OUT/dora-$1/"
        tar czf "$OUT/dora-$1.tgz" -C "$OUT" "dora-$1" && rm -rf "$OUT/dora-$1"
    done
    tail -n 2 "$OUT/machine.txt"
    for part in a b; do
        tar xzf "$OUT/dora-$part.tgz" -O "dora-$part/dora-$part.log" | sed -n '/^| target/,/^$/p'
        grep -A12 "^| mode | K×N | M | r | p | base ms" <(tar xzf "$OUT/dora-$part.tgz" -O "dora-$part/results.md" 2>/dev/null)
        tar xzf "$OUT/dora-$part.tgz" -O "dora-$part/dora-$part.log" | tail -n 1
    done
    ;;
mixed)
    # Many adapters in one batch. The SGMV kernels' CUDA tests first (only the interpreter has
    # run them; MIXED_TESTS=0 skips), then the suite: the targets are lorakern with 64 distinct
    # adapters <= 1.3x one shared adapter and >= 10x PEFT (decode), prefill M = 2048 with 8
    # adapters <= 1.15x base.
    machine_info
    "$PY" -c "import peft; print('peft', peft.__version__)" >> "$OUT/machine.txt" 2>&1
    if [ "${MIXED_TESTS:-1}" = 0 ]; then
        echo "skipped (MIXED_TESTS=0)" > "$OUT/mixed-tests.log"
    elif [ -f tests/test_sgmv.py ]; then
        # the whole file: on a GPU its kernel tests (odd shapes, every dtype pair, dropout masks)
        # run on CUDA, not only the Llama-shape cases marked cuda
        LORAKERN_AUTOTUNE=0 timeout -s INT -k 10 "${MIXED_TESTS_S:-120}" "$PY" -m pytest -q --tb=short \
            --show-capture=no -p no:cacheprovider tests/test_sgmv.py > "$OUT/mixed-tests.log" 2>&1
        echo "rc=$?" >> "$OUT/mixed-tests.log"
    else
        echo "tests/test_sgmv.py is not in this tree: no SGMV kernel tests ran" > "$OUT/mixed-tests.log"
    fi
    tail -n 5 "$OUT/mixed-tests.log"
    for part in "a 4096x4096 75" "b 4096x14336 95"; do
        set -- $part
        timeout "$3" "$PY" -m lorakern.cli bench --suite mixed --shapes custom --kn "$2" --tokens 16 64 256 2048 \
            --adapters 1 8 64 --out "$OUT/mixed-$1" > "$OUT/mixed-$1.log" 2>&1
        echo "bench rc=$?" >> "$OUT/mixed-$1.log"
        mkdir -p "$OUT/mixed-$1" && mv "$OUT/mixed-$1.log" "$OUT/mixed-$1/"
        tar czf "$OUT/mixed-$1.tgz" -C "$OUT" "mixed-$1" && rm -rf "$OUT/mixed-$1"
    done
    tail -n 2 "$OUT/machine.txt"
    for part in a b; do
        tar xzf "$OUT/mixed-$part.tgz" -O "mixed-$part/mixed-$part.log" | sed -n '/^| target/,/^$/p'
        tar xzf "$OUT/mixed-$part.tgz" -O "mixed-$part/mixed-$part.log" | tail -n 1
    done
    ;;
moe)
    # Both LoRA providers form W_eff = W + ΔW every forward: [E, out, in] of both parameters is 2.8 GB
    # in bf16 at these shapes (the three providers share W), so a fwd+bwd holds W, W_eff (saved for
    # the backward) and dW_eff: ~8.5 GB, far below the card's memory; timed calls take milliseconds.
    machine_info
    "$PY" -c "import peft, transformers; print('peft', peft.__version__, 'transformers', transformers.__version__)" \
        >> "$OUT/machine.txt" 2>&1
    timeout "${MOE_BENCH_S:-110}" "$PY" -m lorakern.cli bench --suite moe --out "$OUT/moe" > "$OUT/moe.log" 2>&1
    echo "bench rc=$?" >> "$OUT/moe.log"
    mkdir -p "$OUT/moe" && mv "$OUT/moe.log" "$OUT/moe/"
    tar czf "$OUT/moe.tgz" -C "$OUT" moe && rm -rf "$OUT/moe"
    tail -n 2 "$OUT/machine.txt"
    tar xzf "$OUT/moe.tgz" -O moe/moe.log | sed -n '/^| target/,/^$/p'
    grep -A8 "^| mode | H×I | M | r | hit" <(tar xzf "$OUT/moe.tgz" -O moe/results.md 2>/dev/null)
    tar xzf "$OUT/moe.tgz" -O moe/moe.log | tail -n 1
    ;;
fused)
    LORAKERN_FUSED_GEMM=1 timeout 560 "$PY" -m lorakern.cli bench --providers base lorakern --no-e2e --no-memory \
        --out "$OUT/bench-fused" > "$OUT/bench-fused.log" 2>&1
    echo "bench rc=$?" >> "$OUT/bench-fused.log"
    tar czf "$OUT/bench-fused.tgz" -C "$OUT" bench-fused && rm -rf "$OUT/bench-fused"
    tail -n 40 "$OUT/bench-fused.log"
    ;;
*)
    echo "unknown stage $stage"; exit 2 ;;
esac
