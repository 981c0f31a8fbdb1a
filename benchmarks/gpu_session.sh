#!/usr/bin/env bash
# What a session that is lent a GPU runs there, one stage per device call (each call
# may run 10 minutes; a task now has 15 minutes of device time in all, start-up and
# idle time included — check the device tool's `status`), in this order of value:
#
#   bash benchmarks/gpu_session.sh quick   # everything first-order in one call (~8 min):
#                                          # install, machine info, op-level CUDA tests,
#                                          # `lorakern check`, headline rows at M = 16 and 8192
#   bash benchmarks/gpu_session.sh test    # install, machine info, op-level CUDA tests (large
#                                          # shapes, both GEMM variants), compile/autocast, check
#   bash benchmarks/gpu_session.sh bench   # the benchmark suite: headline shapes, memory
#   bash benchmarks/gpu_session.sh e2e     # the end-to-end ~1B Llama training step vs PEFT
#                                          # (its own call: autotuning its new shapes takes time)
#   bash benchmarks/gpu_session.sh test2   # per-kernel tests and the rest of the suite on CUDA
#   bash benchmarks/gpu_session.sh fused   # lorakern with the fused GEMMs forced
#                                          # (LORAKERN_FUSED_GEMM=1) vs base: what the measured
#                                          # dispatch turned down, and by how much
#
# Everything lands in $OUT (the device tool's output folder; out/gpu when run by hand),
# at most 8 files and no deeper than $OUT/name, as the device tool brings back: bench
# folders are packed into .tgz files. Unpack into benchmarks/results/<card>-<date>/ and
# commit, then add the numbers to benchmarks/NOTES.md.
# The GPU images carry torch, Triton, peft, transformers and matplotlib: nothing is
# downloaded (pip --no-deps). tests/conftest.py turns GEMM autotuning off for the tests
# (LORAKERN_AUTOTUNE=0); check and bench autotune.
set -u
stage=${1:?usage: gpu_session.sh quick|test|bench|e2e|test2|fused}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"

pip install -q --no-deps --no-build-isolation -e . > "$OUT/install-$stage.log" 2>&1 || {
    echo "install failed"; tail -n 20 "$OUT/install-$stage.log"; exit 1; }

case "$stage" in
quick)
    {
        nvidia-smi
        echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        lorakern info
    } > "$OUT/machine.txt" 2>&1
    timeout 150 python -m pytest -q -p no:cacheprovider tests/test_kernels_op.py tests/test_compile.py \
        > "$OUT/pytest-cuda-op.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-op.txt"
    timeout 60 lorakern check > "$OUT/check.txt" 2>&1
    echo "rc=$?" >> "$OUT/check.txt"
    # Headline shapes, decode and training rows only: the suite writes at the end, so
    # keep it well inside its timeout.
    timeout 300 lorakern bench --tokens 16 8192 --no-e2e --out "$OUT/bench" > "$OUT/bench.log" 2>&1
    echo "bench rc=$?" >> "$OUT/bench.log"
    tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
    tail -n 5 "$OUT/pytest-cuda-op.txt" "$OUT/check.txt"
    tail -n 30 "$OUT/bench.log"
    ;;
test)
    {
        nvidia-smi
        echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        lorakern info
    } > "$OUT/machine.txt" 2>&1
    timeout 400 python -m pytest -q -p no:cacheprovider \
        tests/test_kernels_op.py tests/test_compile.py tests/test_autocast.py tests/test_kernels_aot.py \
        > "$OUT/pytest-cuda-op.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-op.txt"
    timeout 120 lorakern check > "$OUT/check.txt" 2>&1
    echo "rc=$?" >> "$OUT/check.txt"
    tail -n 5 "$OUT/pytest-cuda-op.txt" "$OUT/check.txt"
    ;;
test2)
    timeout 380 python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        > "$OUT/pytest-cuda-kernels.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-kernels.txt"
    timeout 180 python -m pytest -q -p no:cacheprovider --ignore=tests/test_kernels.py \
        --ignore=tests/test_kernels_op.py --ignore=tests/test_compile.py --ignore=tests/test_autocast.py \
        --ignore=tests/test_kernels_aot.py > "$OUT/pytest-cuda-rest.txt" 2>&1
    echo "rc=$?" >> "$OUT/pytest-cuda-rest.txt"
    tail -n 5 "$OUT"/pytest-cuda-kernels.txt "$OUT/pytest-cuda-rest.txt"
    ;;
bench)
    # The suite writes its files at the end: a run cut by the timeout leaves nothing,
    # so the end-to-end step (slow first call: autotuning) is a stage of its own.
    timeout 560 lorakern bench --no-e2e --out "$OUT/bench" > "$OUT/bench.log" 2>&1
    echo "bench rc=$?" >> "$OUT/bench.log"
    tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
    tail -n 40 "$OUT/bench.log"
    ;;
e2e)
    timeout 560 lorakern bench --shapes custom --kn 4096x4096 --tokens 1 --modes decode --no-memory \
        --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
    echo "e2e rc=$?" >> "$OUT/e2e.log"
    tar czf "$OUT/e2e.tgz" -C "$OUT" e2e && rm -rf "$OUT/e2e"
    tail -n 30 "$OUT/e2e.log"
    ;;
fused)
    LORAKERN_FUSED_GEMM=1 timeout 560 lorakern bench --providers base lorakern --no-e2e --no-memory \
        --out "$OUT/bench-fused" > "$OUT/bench-fused.log" 2>&1
    echo "bench rc=$?" >> "$OUT/bench-fused.log"
    tar czf "$OUT/bench-fused.tgz" -C "$OUT" bench-fused && rm -rf "$OUT/bench-fused"
    tail -n 40 "$OUT/bench-fused.log"
    ;;
*)
    echo "unknown stage $stage"; exit 2 ;;
esac
