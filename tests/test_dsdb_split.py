"""The dS/dB pass's 2-D grid ("split": N cut into column ranges, dS left as fp32 partials
[P, M, r]) and the dx / dA kernels that add those partials on load, against the fp64
oracle; its config, the dispatch between the 1-D and 2-D grids, and the whole backward
through it. In Triton's interpreter the split config uses 32-row, 16-column blocks and up
to 3 splits (backward._dsdb_split_config), so these small shapes take several splits.
"""

from __future__ import annotations

import pytest
import torch

from lorakern import reference
from tests.conftest import KERNEL_DEVICE, requires_triton
from tests.kernel_cases import DTYPE_IDS, DTYPE_PAIRS, DTYPES, check_against_oracle, pair_id, poisoned, randn

pytestmark = requires_triton
pytest.importorskip("triton")

params = pytest.mark.parametrize
SEED = 4321
K = 45
def _kernels():
    from lorakern import kernels

    return kernels


def _split_config(M, N, r, dt):
    from lorakern.kernels import backward

    return backward._dsdb_split_config(M, N, r, dt.itemsize)


def _splits(M, N, r, dt):
    """The splits the backward takes at this shape: 3 here in the interpreter, 2 on a GPU."""
    from lorakern.kernels.backward import dsdb_split_n

    return dsdb_split_n(M, N, r, dt)


def _force_split(monkeypatch):
    """LORAKERN_FUSED_GEMM = 1: dispatch takes the split grid (and the fused dx) without
    timing, as the interpreter does anyway — so these tests read the same on a GPU."""
    from lorakern import settings

    monkeypatch.setattr(settings, "fused_gemm", "1")


def _in_order(parts: torch.Tensor) -> torch.Tensor:
    """Σ_p parts[p] in fp32, added in index order: what the kernels and sum_partials compute."""
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


# (M, N, split_n): M not a multiple of the 32-row block; N = 75 is 5 column blocks of 16, so
# 2 splits take 3 + 2 blocks (N not a multiple of BLOCK_N·SPLIT_N), 3 splits 2 + 2 + 1, and 8
# splits leave 3 empty (more splits than column blocks); M = 0 returns before launching.
SHAPES = [(70, 75, 2), (33, 75, 3), (70, 75, 8), (0, 75, 3)]


@params("dtypes", DTYPE_PAIRS, ids=pair_id)
@params("shape", SHAPES, ids=lambda s: "M{}-N{}-split{}".format(*s))
@params("r", [7, 16], ids=lambda r: f"r{r}")
def test_split_dsdb_against_oracle(dtypes, shape, r):
    dt, adt = dtypes
    M, N, split_n = shape
    dy = randn(M, N, dtype=dt, device=KERNEL_DEVICE)
    B = randn(N, r, dtype=adt, device=KERNEL_DEVICE)
    S = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    dS_ref, dB_ref = reference.lora_backward_dsdb(dy, B, S, 0.5)
    dS_64, dB_64 = reference.lora_backward_dsdb(dy.double(), B.double(), S.double(), 0.5)
    k = _kernels()

    dS, dB = poisoned(lambda: k.lora_backward_dsdb(dy, B, S, 0.5, split_n=split_n))
    assert dS.dtype == torch.float32 and dS.shape == (M, r) and dB.dtype == adt and dB.shape == (N, r)
    check_against_oracle(dS, dS_ref, dS_64, dt, "dS")
    if M == 0:
        assert torch.equal(dB, torch.zeros_like(dB))
        return
    check_against_oracle(dB, dB_ref, dB_64, dt, "dB")

    ds_parts, db_parts = poisoned(lambda: k.lora_backward_dsdb(dy, B, S, 0.5, reduce=False, split_n=split_n))
    assert ds_parts.shape == (split_n, M, r) and ds_parts.dtype == torch.float32
    cfg = _split_config(M, N, r, dt)  # 32 x 16 blocks in the interpreter
    assert db_parts.shape == (-(-M // cfg["BLOCK_M"]), N, r) and db_parts.dtype == torch.float32
    # Splits past the column blocks have no columns: their dS partial is written as zeros.
    n_blocks = -(-N // cfg["BLOCK_N"])
    used = -(-n_blocks // -(-n_blocks // split_n))
    assert torch.equal(ds_parts[used:], torch.zeros_like(ds_parts[used:]))
    # reduce=True is the in-order sum of these partials, bit for bit.
    assert torch.equal(dS, _in_order(ds_parts))
    assert torch.equal(dB, _in_order(db_parts).to(adt))
    check_against_oracle(_in_order(ds_parts), dS_ref, dS_64, dt, "dS (partials)")


def test_one_split_is_the_rows_grid():
    """split_n = 1 is the 1-D grid of before: dS [M, r] (not partials) and the rows config's
    dB partials (one per 32-row block in the interpreter)."""
    M, N, r = 70, 75, 7
    dy, B, S = (randn(*s, dtype=torch.float32, device=KERNEL_DEVICE) for s in ((M, N), (N, r), (M, r)))
    dS, db_parts = _kernels().lora_backward_dsdb(dy, B, S, 0.5, reduce=False)
    from lorakern.kernels import backward

    assert dS.shape == (M, r) and db_parts.shape == (-(-M // backward._dsdb_config(M, r, 4)["BLOCK_M"]), N, r)
    dS_64, dB_64 = reference.lora_backward_dsdb(dy.double(), B.double(), S.double(), 0.5)
    check_against_oracle(dS, reference.lora_backward_dsdb(dy, B, S, 0.5)[0], dS_64, torch.float32, "dS")
    check_against_oracle(db_parts.sum(0), reference.lora_backward_dsdb(dy, B, S, 0.5)[1], dB_64, torch.float32, "dB")


def test_gpu_split_config_in_the_interpreter(monkeypatch):
    """The GPU blocks of the split grid (128 rows x 64 columns at this M, 4 splits), run
    here: dB partials per 128 rows, dS as 4 partials, both summing to the oracle."""
    from lorakern.kernels import backward

    monkeypatch.setattr(backward, "interpreting", lambda: False)
    M, N, r, dt = 300, 200, 16, torch.bfloat16
    cfg = backward._dsdb_split_config(M, N, r, 2)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_N"]) == (128, 64, 4)
    dy = randn(M, N, dtype=dt, device=KERNEL_DEVICE)
    B = randn(N, r, dtype=torch.float32, device=KERNEL_DEVICE)
    S = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    ds_parts, db_parts = poisoned(lambda: _kernels().lora_backward_dsdb(dy, B, S, 0.5, reduce=False, split_n=4))
    assert ds_parts.shape == (4, M, r) and db_parts.shape == (3, N, r)
    dS_64, dB_64 = reference.lora_backward_dsdb(dy.double(), B.double(), S.double(), 0.5)
    dS_ref, dB_ref = reference.lora_backward_dsdb(dy, B, S, 0.5)
    check_against_oracle(_in_order(ds_parts), dS_ref, dS_64, dt, "dS")
    check_against_oracle(_in_order(db_parts), dB_ref, dB_64, dt, "dB")


@params("M, N, block_m, split_n, programs", [
    (8192, 4096, 256, 4, 128), (8192, 1024, 256, 4, 128), (8192, 14336, 256, 4, 128),
    (2048, 4096, 128, 8, 128), (2048, 1024, 128, 8, 128), (2048, 14336, 128, 8, 128),
    (4096, 4096, 256, 8, 128), (16384, 4096, 256, 2, 128),
    (32768, 4096, 256, 1, 128),  # M fills a wave alone: not offered
    (512, 4096, 128, 8, 32),  # capped at 8 splits
    (8192, 128, 256, 2, 64),  # capped by N's two column blocks
    (2048, 320, 128, 5, 80),  # 5 column blocks: 5 splits of one, not 8 with empty ones
])
def test_gpu_split_config(monkeypatch, M, N, block_m, split_n, programs):
    """The split grid's GPU config (bf16, r = 16): about one wave of 128 programs, at most 8
    splits, never more than N's column blocks, no empty split."""
    from lorakern.kernels import backward

    monkeypatch.setattr(backward, "interpreting", lambda: False)
    cfg = backward._dsdb_split_config(M, N, 16, 2)
    assert (cfg["BLOCK_M"], cfg["SPLIT_N"]) == (block_m, split_n)
    assert -(-M // cfg["BLOCK_M"]) * cfg["SPLIT_N"] == programs
    n_blocks = -(-N // cfg["BLOCK_N"])
    assert (cfg["SPLIT_N"] - 1) * -(-n_blocks // cfg["SPLIT_N"]) < n_blocks  # the last split has columns
    assert backward.dsdb_split_n(M, N, 16, torch.bfloat16) == split_n


def test_symbolic_m_takes_one_split(monkeypatch):
    """A dynamic M under torch.compile is not compared (that would specialise the graph)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from lorakern.kernels import backward

    monkeypatch.setattr(backward, "interpreting", lambda: False)
    M = ShapeEnv().create_unbacked_symint()
    assert backward._dsdb_split_config(M, 4096, 16, 2)["SPLIT_N"] == 1


# ----------------------------------------------------------------------------- dx and dA on partials


def _partials(P, M, r, layout):
    """Random fp32 dS partials [P, M, r]: contiguous, or interleaved (stride between
    partials r, not M·r) so the kernels must use the leading stride they are given."""
    if layout == "contiguous":
        return randn(P, M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    return randn(M, P, r, dtype=torch.float32, device=KERNEL_DEVICE).transpose(0, 1)


@params("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)], ids=pair_id)
@params("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@params("fused", [True, False], ids=["fused", "unfused"])
@params("layout", ["contiguous", "interleaved"])
def test_dx_sums_ds_partials(dtypes, p, fused, layout):
    """dx given dS as 3 partials equals dx given their in-order sum (bit for bit) and the oracle."""
    dt, adt = dtypes
    M, N, r = 70, 37, 7
    dy = randn(M, N, dtype=dt, device=KERNEL_DEVICE)
    W = randn(N, K, dtype=dt, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=adt, device=KERNEL_DEVICE)
    parts = _partials(3, M, r, layout)
    dS = _in_order(parts)
    k = _kernels()
    out = poisoned(lambda: k.lora_backward_dx(dy, W, parts, A, p, SEED, fused=fused))
    assert torch.equal(out, k.lora_backward_dx(dy, W, dS, A, p, SEED, fused=fused))
    oracle = reference.lora_backward_dx(dy.double(), W.double(), dS.double(), A.double(), p, SEED)
    check_against_oracle(out, reference.lora_backward_dx(dy, W, dS, A, p, SEED), oracle, dt, "dx")
    # weight None (the LoRA term alone) takes the same pass.
    alone = k.lora_backward_dx(dy, None, parts, A, p, SEED)
    assert torch.equal(alone, k.lora_backward_dx(dy, None, dS, A, p, SEED))


@params("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)], ids=pair_id)
@params("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@params("layout", ["contiguous", "interleaved"])
def test_da_sums_ds_partials(dtypes, p, layout):
    """dA given dS as 3 partials equals dA given their in-order sum (bit for bit) and the oracle."""
    dt, adt = dtypes
    M, r = 70, 7
    x = randn(M, K, dtype=dt, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=adt, device=KERNEL_DEVICE)
    parts = _partials(3, M, r, layout)
    dS = _in_order(parts)
    k = _kernels()
    out = poisoned(lambda: k.lora_backward_da(parts, x, A, p, SEED))
    assert torch.equal(out, k.lora_backward_da(dS, x, A, p, SEED))
    partial_sums = k.lora_backward_da(parts, x, A, p, SEED, reduce=False)
    assert torch.equal(partial_sums, k.lora_backward_da(dS, x, A, p, SEED, reduce=False))
    oracle = reference.lora_backward_da(dS.double(), x.double(), A.double(), p, SEED)
    check_against_oracle(out, reference.lora_backward_da(dS, x, A, p, SEED), oracle, dt, "dA")


def test_launchers_reject_mismatched_ds():
    """dS must be [M, r] or [P >= 1, M, r]; the errors name the shapes."""
    k = _kernels()
    M, N, r = 6, 37, 3
    dy = randn(M, N, dtype=torch.float32, device=KERNEL_DEVICE)
    W = randn(N, K, dtype=torch.float32, device=KERNEL_DEVICE)
    x = randn(M, K, dtype=torch.float32, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=torch.float32, device=KERNEL_DEVICE)
    for bad in ((2, M + 1, r), (2, M, r + 1), (0, M, r), (1, 2, M, r), (M, r + 1)):
        dS = torch.zeros(bad, device=KERNEL_DEVICE)
        shape = r"\(" + ", ".join(map(str, bad)) + r"\)"
        with pytest.raises(ValueError, match=rf"lora_backward_dx: dy \(6, 37\), weight \(37, 45\), dS {shape}"):
            k.lora_backward_dx(dy, W, dS, A, 0.0, 0)
        with pytest.raises(ValueError, match=rf"lora_backward_da: dS {shape}, x \(6, 45\)"):
            k.lora_backward_da(dS, x, A, 0.0, 0)
    B, S = randn(N, r, dtype=torch.float32, device=KERNEL_DEVICE), randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"split_n must be >= 1, got 0 \(dy \(6, 37\)\)"):
        k.lora_backward_dsdb(dy, B, S, 1.0, split_n=0)


# ----------------------------------------------------------------------------- dispatch and the whole backward


def _spy_dsdb(monkeypatch):
    """Record the split_n of every lora_backward_dsdb call the dispatch module makes."""
    from lorakern.kernels import dispatch

    calls = []
    real = dispatch.lora_backward_dsdb

    def spy(*args, **kwargs):
        calls.append(kwargs.get("split_n", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "lora_backward_dsdb", spy)
    return calls


def _backward_inputs(M, N, r, dt, adt=torch.float32):
    x = randn(M, K, dtype=dt, device=KERNEL_DEVICE)
    W = randn(N, K, dtype=dt, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=adt, device=KERNEL_DEVICE, scale=K**-0.5)
    B = randn(N, r, dtype=adt, device=KERNEL_DEVICE)
    S = reference.lora_shrink(x, A, 0.1, SEED)
    dy = randn(M, N, dtype=dt, device=KERNEL_DEVICE)
    return dy, x, W, A, B, S


@params("dt", DTYPES, ids=DTYPE_IDS.get)
@params("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@params("needs", [(True, True, True), (True, False, True), (False, True, True), (False, False, True)],
        ids=["all", "no-dA", "no-dx", "dB-only"])
def test_whole_backward_through_the_split_grid(monkeypatch, dt, p, needs):
    """lora_linear_backward through the split grid (dispatch's FUSED, the interpreter's
    choice): every gradient against the oracle, with dA's partial sum (sum_partials) and
    without it (the dS/dB launcher reduces dS's and dB's partials itself)."""
    _force_split(monkeypatch)
    calls = _spy_dsdb(monkeypatch)
    M, N, r = 70, 75, 7
    dy, x, W, A, B, S = _backward_inputs(M, N, r, dt)
    k = _kernels()
    out = poisoned(lambda: k.lora_linear_backward(dy, x, W, A, B, S, 0.5, p, SEED, needs))
    assert calls == [_splits(M, N, r, dt)] and calls[0] > 1  # min(3, 5 column blocks) in the interpreter
    ref = reference.lora_linear_backward(dy, x, W, A, B, S, 0.5, p, SEED, needs)
    oracle = reference.lora_linear_backward(dy.double(), x.double(), W.double(), A.double(), B.double(), S.double(),
                                            0.5, p, SEED, needs)
    for name, got, want, want64, need in zip(("dx", "dA", "dB"), out, ref, oracle, needs):
        if not need:
            assert got is None, name
            continue
        check_against_oracle(got, want, want64, dt, name)


def test_whole_backward_is_bit_reproducible(monkeypatch):
    """Two backwards through the split grid (the second into NaN-poisoned buffers) agree bit
    for bit: partials summed in a fixed order, nothing left unwritten."""
    _force_split(monkeypatch)
    calls = _spy_dsdb(monkeypatch)
    dy, x, W, A, B, S = _backward_inputs(70, 75, 7, torch.bfloat16)
    k = _kernels()
    first = k.lora_linear_backward(dy, x, W, A, B, S, 0.5, 0.1, SEED, (True, True, True))
    second = poisoned(lambda: k.lora_linear_backward(dy, x, W, A, B, S, 0.5, 0.1, SEED, (True, True, True)))
    split = _splits(70, 75, 7, torch.bfloat16)
    assert calls == [split, split] and split > 1
    for name, a, b in zip(("dx", "dA", "dB"), first, second):
        assert torch.equal(a, b), name
    dS1, dB1 = k.lora_backward_dsdb(dy, B, S, 0.5, split_n=3)
    dS2, dB2 = poisoned(lambda: k.lora_backward_dsdb(dy, B, S, 0.5, split_n=3))
    assert torch.equal(dS1, dS2) and torch.equal(dB1, dB2)


@params("forced, want", [("0", 1), ("1", 3)], ids=["rows", "split"])
def test_forced_grid_and_the_same_gradients(monkeypatch, forced, want):
    """LORAKERN_FUSED_GEMM = 0 / 1 force the 1-D / 2-D grid; both give the oracle's gradients."""
    from lorakern import settings

    monkeypatch.setattr(settings, "fused_gemm", forced)
    calls = _spy_dsdb(monkeypatch)
    dy, x, W, A, B, S = _backward_inputs(70, 75, 7, torch.float16)
    out = _kernels().lora_linear_backward(dy, x, W, A, B, S, 0.5, 0.1, SEED, (True, True, True))
    assert calls == [want if want == 1 else _splits(70, 75, 7, torch.float16)]
    ref = reference.lora_linear_backward(dy, x, W, A, B, S, 0.5, 0.1, SEED, (True, True, True))
    oracle = reference.lora_linear_backward(dy.double(), x.double(), W.double(), A.double(), B.double(), S.double(),
                                            0.5, 0.1, SEED, (True, True, True))
    for name, got, want_, want64 in zip(("dx", "dA", "dB"), out, ref, oracle):
        check_against_oracle(got, want_, want64, torch.float16, name)


def test_split_not_offered_for_one_column_block(monkeypatch):
    """N within one column block: no split, no dispatch key; the 1-D grid runs."""
    from lorakern.kernels import dispatch

    calls = _spy_dsdb(monkeypatch)
    chosen = []
    monkeypatch.setattr(dispatch.DISPATCH, "choose", lambda *a, **kw: chosen.append(a[0]) or dispatch.FUSED)
    dy, x, W, A, B, S = _backward_inputs(40, 16, 4, torch.float32)
    dispatch.lora_backward_dsdb_auto(dy, B, S, 0.5, reduce=True)
    assert calls == [1] and chosen == []


@params("with_da", [False, True], ids=["dsdb", "dsdb+dA"])
@params("choice, want", [("fused", 3), ("unfused", 1)])
def test_dispatch_maps_fused_to_split(monkeypatch, choice, want, with_da):
    """The "dsdb" key: FUSED names the split grid, UNFUSED the 1-D one; both candidates are
    timed with reduce=False (partials out, nothing else written) and, when the backward
    computes dA, with the dA pass reading their dS (its key then holds K and dropout)."""
    from lorakern.kernels import dispatch

    seen = {}

    class Scripted:
        def choose(self, key, candidates, device, is_traced=False):
            seen["key"], seen["traced"] = key, is_traced
            seen["outs"] = {name: fn() for name, fn in candidates.items()}
            return choice

    M, N, r = 70, 75, 7
    dy, x, W, A, B, S = _backward_inputs(M, N, r, torch.float32)
    monkeypatch.setattr(dispatch, "DISPATCH", Scripted())
    calls = _spy_dsdb(monkeypatch)
    da_calls = []
    real_da = dispatch.lora_backward_da
    monkeypatch.setattr(dispatch, "lora_backward_da", lambda dS, *a, **kw: da_calls.append(dS.shape) or real_da(dS, *a, **kw))
    da_args = (x, A, 0.1, SEED) if with_da else None
    dS, dB = dispatch.lora_backward_dsdb_auto(dy, B, S, 0.5, reduce=True, da_args=da_args)
    assert seen["key"] == ("dsdb", 128, N, 16, (K, True) if with_da else None, torch.float32, dy.device)
    assert seen["traced"] is False
    split = _splits(M, N, r, torch.float32)
    want = split if want == 3 else want
    assert calls == [split, 1, want]  # the two timed candidates, then the chosen grid
    assert da_calls == ([(split, M, r), (M, r)] if with_da else [])
    for out in seen["outs"].values():  # partials: dA's [P, r, K] with dA, dB's [P, N, r] without
        assert out.dim() == 3 and out.shape[1:] == ((r, K) if with_da else (N, r))
    assert dS.shape == (M, r) and dB.shape == (N, r)
    dS_64, dB_64 = reference.lora_backward_dsdb(dy.double(), B.double(), S.double(), 0.5)
    dS_ref, dB_ref = reference.lora_backward_dsdb(dy, B, S, 0.5)
    check_against_oracle(dS, dS_ref, dS_64, torch.float32, "dS")
    check_against_oracle(dB, dB_ref, dB_64, torch.float32, "dB")


def test_dx_dispatch_key_holds_the_rank_of_partial_ds(monkeypatch):
    """lora_backward_dx_auto keys its measurement by r's pad; given dS as partials [P, M, r]
    it must read r from the last dim (not M from dim 1), or each M would be a new key."""
    from lorakern.kernels import dispatch
    from lorakern.kernels.common import rank_pad

    keys = []

    class Scripted:
        def choose(self, key, candidates, device, is_traced=False):
            keys.append(key)
            return dispatch.FUSED

    M, N, r = 70, 37, 7
    dy = randn(M, N, dtype=torch.float32, device=KERNEL_DEVICE)
    W = randn(N, K, dtype=torch.float32, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=torch.float32, device=KERNEL_DEVICE)
    parts = _partials(3, M, r, "contiguous")
    monkeypatch.setattr(dispatch, "DISPATCH", Scripted())
    out = dispatch.lora_backward_dx_auto(dy, W, parts, A, 0.0, SEED)
    assert len(keys) == 1 and keys[0][0] == "dx" and keys[0][2:5] == (N, K, rank_pad(r))
    assert torch.equal(out, _kernels().lora_backward_dx(dy, W, _in_order(parts), A, 0.0, SEED))
