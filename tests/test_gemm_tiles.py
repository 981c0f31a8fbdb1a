"""The GEMM autotuner's tiles and their pruning by M (kernels/forward.py prune_tiles).

Pure bookkeeping, no kernel runs: which of GEMM_TILES the forward and dx GEMMs compile and
time for an M bucket. Decode-sized M must keep the 16-row tiles (and lose the 128- / 256-row
ones, which waste most of their rows); large M must drop the 16-row tiles (which re-read W
M / 16 times); a symbolic M (bucket 0, torch.compile) keeps everything.
"""

from __future__ import annotations

import pytest
import triton

from tests.conftest import requires_triton

pytestmark = requires_triton


def _configs():
    from lorakern.kernels import forward

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bc, "BLOCK_K": br, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bc, br, w, s in forward.GEMM_TILES]


def _rows(configs) -> set[int]:
    return {c.kwargs["BLOCK_M"] for c in configs}


@pytest.mark.parametrize("bucket", [1, 16, 32])
def test_decode_buckets_keep_only_small_row_tiles(bucket):
    from lorakern.kernels.forward import prune_tiles

    kept = prune_tiles(_configs(), {"M_BUCKET": bucket})
    assert _rows(kept) == {16, 64}
    assert any(c.kwargs["BLOCK_M"] == 16 and c.kwargs["BLOCK_N"] == 32 for c in kept)  # 128 programs at N = 4096


@pytest.mark.parametrize("bucket", [256, 8192])
def test_large_buckets_drop_the_16_row_tiles(bucket):
    from lorakern.kernels.forward import prune_tiles

    kept = prune_tiles(_configs(), {"M_BUCKET": bucket})
    assert 16 not in _rows(kept) and {64, 128, 256} <= _rows(kept)


@pytest.mark.parametrize("named", [{"M_BUCKET": 64}, {"M_BUCKET": 0}, {}, {"M_BUCKET": object()}])
def test_middle_symbolic_or_unknown_buckets_keep_every_tile(named):
    from lorakern.kernels.forward import prune_tiles

    configs = _configs()
    assert prune_tiles(configs, named) == configs


def test_pruning_never_returns_nothing():
    from lorakern.kernels.forward import prune_tiles

    only_big = [c for c in _configs() if c.kwargs["BLOCK_M"] >= 128]
    assert prune_tiles(only_big, {"M_BUCKET": 16}) == only_big


def test_both_tuned_gemms_prune_by_m():
    from lorakern.kernels import backward, forward

    assert forward._lora_fwd_kernel_tuned.early_config_prune is forward.prune_tiles
    assert backward._lora_bwd_dx_kernel_tuned.early_config_prune is forward.prune_tiles
