"""Every Triton kernel alone against its reference function and an fp64 oracle.

On a machine without a GPU these run in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from lorakern import reference
from tests.conftest import KERNEL_DEVICE, requires_triton

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lorakern.kernels.common import cast, interpreting  # noqa: E402
from tests.kernel_cases import DTYPE_IDS, DTYPE_PAIRS, check_against_oracle, pair_id, poisoned, randn

pytestmark = requires_triton

K, N = 45, 37  # odd, not multiples of 16
SEED = 1234
MS = [0, 1, 7, 130]
RANKS = [1, 7, 16, 64]
PS = [0.0, 0.1]
def _kernels():
    from lorakern import kernels

    return kernels


params = pytest.mark.parametrize
dtype_pairs = params("dtypes", DTYPE_PAIRS, ids=pair_id)
ms = params("M", MS, ids=lambda m: f"M{m}")
ranks = params("r", RANKS, ids=lambda r: f"r{r}")
ps = params("p", PS, ids=lambda p: f"p{p}")


@dtype_pairs
@ms
@ranks
@ps
def test_shrink(dtypes, M, r, p):
    dt, adt = dtypes
    x = randn(M, K, dtype=dt, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=adt, device=KERNEL_DEVICE)
    out = poisoned(lambda: _kernels().lora_shrink(x, A, p, SEED))
    assert out.dtype == torch.float32
    ref = reference.lora_shrink(x, A, p, SEED)
    oracle = reference.lora_shrink(x.double(), A.double(), p, SEED)
    check_against_oracle(out, ref, oracle, dt, "S")


@dtype_pairs
@ms
@ranks
@params("has_bias", [True, False], ids=["bias", "nobias"])
@params("variant", ["fused", "unfused"])
def test_forward(dtypes, M, r, has_bias, variant):
    dt, adt = dtypes
    x = randn(M, K, dtype=dt, device=KERNEL_DEVICE)
    W = randn(N, K, dtype=dt, device=KERNEL_DEVICE)
    bias = randn(N, dtype=dt, device=KERNEL_DEVICE) if has_bias else None
    S = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    B = randn(N, r, dtype=adt, device=KERNEL_DEVICE)
    fn = _kernels().lora_forward_fused if variant == "fused" else _kernels().lora_forward_unfused
    out = poisoned(lambda: fn(x, W, bias, S, B, 0.5))
    assert out.dtype == dt
    ref = reference.lora_forward(x, W, bias, S, B, 0.5)
    b64 = None if bias is None else bias.double()
    oracle = reference.lora_forward(x.double(), W.double(), b64, S.double(), B.double(), 0.5)
    check_against_oracle(out, ref, oracle, dt, "y")


@dtype_pairs
@ms
@ranks
def test_backward_dsdb(dtypes, M, r):
    dt, adt = dtypes
    dy = randn(M, N, dtype=dt, device=KERNEL_DEVICE)
    B = randn(N, r, dtype=adt, device=KERNEL_DEVICE)
    S = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    dS, dB = poisoned(lambda: _kernels().lora_backward_dsdb(dy, B, S, 0.5))
    assert dS.dtype == torch.float32 and dB.dtype == adt
    dS_ref, dB_ref = reference.lora_backward_dsdb(dy, B, S, 0.5)
    dS_64, dB_64 = reference.lora_backward_dsdb(dy.double(), B.double(), S.double(), 0.5)
    check_against_oracle(dS, dS_ref, dS_64, dt, "dS")
    if M == 0:
        assert torch.equal(dB, torch.zeros_like(dB))
    else:
        check_against_oracle(dB, dB_ref, dB_64, dt, "dB")


@dtype_pairs
@ms
@ranks
@ps
@params("fused", [True, False], ids=["fused", "unfused"])
def test_backward_dx(dtypes, M, r, p, fused):
    dt, adt = dtypes
    dy = randn(M, N, dtype=dt, device=KERNEL_DEVICE)
    W = randn(N, K, dtype=dt, device=KERNEL_DEVICE)
    dS = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=adt, device=KERNEL_DEVICE)
    out = poisoned(lambda: _kernels().lora_backward_dx(dy, W, dS, A, p, SEED, fused=fused))
    assert out.dtype == dt
    ref = reference.lora_backward_dx(dy, W, dS, A, p, SEED)
    oracle = reference.lora_backward_dx(dy.double(), W.double(), dS.double(), A.double(), p, SEED)
    check_against_oracle(out, ref, oracle, dt, "dx")


@dtype_pairs
@ms
@ranks
@ps
def test_backward_da(dtypes, M, r, p):
    dt, adt = dtypes
    dS = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    x = randn(M, K, dtype=dt, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=adt, device=KERNEL_DEVICE)
    out = poisoned(lambda: _kernels().lora_backward_da(dS, x, A, p, SEED))
    assert out.dtype == adt
    if M == 0:
        assert torch.equal(out, torch.zeros_like(out))
        return
    ref = reference.lora_backward_da(dS, x, A, p, SEED)
    oracle = reference.lora_backward_da(dS.double(), x.double(), A.double(), p, SEED)
    check_against_oracle(out, ref, oracle, dt, "dA")


def test_da_split_reduction_covers_every_row():
    """M spanning many row blocks and splits: every row must land in exactly one partial."""
    M, r = 517, 5
    dS = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    x = randn(M, K, dtype=torch.float32, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=torch.float32, device=KERNEL_DEVICE)
    out = _kernels().lora_backward_da(dS, x, A, 0.2, SEED)
    oracle = reference.lora_backward_da(dS.double(), x.double(), A.double(), 0.2, SEED)
    check_against_oracle(out, reference.lora_backward_da(dS, x, A, 0.2, SEED), oracle, torch.float32, "dA")


@params("layout", ["transposed", "sliced"])
def test_kernels_accept_strided_inputs(layout):
    """Non-contiguous x / W / A / B are read through their strides, not copied."""
    M, r, dt = 33, 7, torch.float32
    if layout == "transposed":
        x = randn(K, M, dtype=dt, device=KERNEL_DEVICE).t()
        W = randn(K, N, dtype=dt, device=KERNEL_DEVICE).t()
        A = randn(K, r, dtype=dt, device=KERNEL_DEVICE).t()
        B = randn(r, N, dtype=dt, device=KERNEL_DEVICE).t()
    else:
        x = randn(M, 2 * K, dtype=dt, device=KERNEL_DEVICE)[:, ::2]
        W = randn(N, 2 * K, dtype=dt, device=KERNEL_DEVICE)[:, 1::2]
        A = randn(r, K + 3, dtype=dt, device=KERNEL_DEVICE)[:, :K]
        B = randn(N, r + 2, dtype=dt, device=KERNEL_DEVICE)[:, 2:]
    assert not x.is_contiguous()
    kn = _kernels()
    S = kn.lora_shrink(x, A, 0.1, SEED)
    y = kn.lora_forward_fused(x, W, None, S, B, 2.0)
    dy = randn(M, N, dtype=dt, device=KERNEL_DEVICE).t().contiguous().t()
    dS, dB = kn.lora_backward_dsdb(dy, B, S, 2.0)
    dx = kn.lora_backward_dx(dy, W, dS, A, 0.1, SEED)
    dA = kn.lora_backward_da(dS, x, A, 0.1, SEED)
    x64, W64, A64, B64 = x.double(), W.double(), A.double(), B.double()
    S64 = reference.lora_shrink(x64, A64, 0.1, SEED)
    dS64, dB64 = reference.lora_backward_dsdb(dy.double(), B64, S64, 2.0)
    pairs = {
        "S": (S, reference.lora_shrink(x, A, 0.1, SEED), S64),
        "y": (y, reference.lora_forward(x, W, None, S, B, 2.0), reference.lora_forward(x64, W64, None, S64, B64, 2.0)),
        "dS": (dS, reference.lora_backward_dsdb(dy, B, S, 2.0)[0], dS64),
        "dB": (dB, reference.lora_backward_dsdb(dy, B, S, 2.0)[1], dB64),
        "dx": (dx, reference.lora_backward_dx(dy, W, dS, A, 0.1, SEED), reference.lora_backward_dx(dy.double(), W64, dS64, A64, 0.1, SEED)),
        "dA": (dA, reference.lora_backward_da(dS, x, A, 0.1, SEED), reference.lora_backward_da(dS64, x64, A64, 0.1, SEED)),
    }
    for name, (out, ref, oracle) in pairs.items():
        check_against_oracle(out, ref, oracle, dt, name)


def test_launchers_reject_mismatched_shapes():
    kn = _kernels()
    x = randn(4, K, dtype=torch.float32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"\(4, 45\).*\(3, 44\)"):
        kn.lora_shrink(x, randn(3, K - 1, dtype=torch.float32, device=KERNEL_DEVICE), 0.0, 0)
    W = randn(N, K, dtype=torch.float32, device=KERNEL_DEVICE)
    S = randn(4, 3, dtype=torch.float32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"lora_B \(37, 2\)"):
        kn.lora_forward_fused(x, W, None, S, randn(N, 2, dtype=torch.float32, device=KERNEL_DEVICE), 1.0)
    # weight=None (the LoRA term alone): the error names the shapes, it does not crash on None.
    with pytest.raises(ValueError, match=r"weight None.*lora_B \(37, 2\)"):
        kn.lora_forward_unfused(x, None, None, S, randn(N, 2, dtype=torch.float32, device=KERNEL_DEVICE), 1.0)
    dy = randn(4, N, dtype=torch.float32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"weight None, dS \(4, 2\)"):
        kn.lora_backward_dx(dy, None, randn(4, 2, dtype=torch.float32, device=KERNEL_DEVICE),
                            randn(3, K, dtype=torch.float32, device=KERNEL_DEVICE), 0.0, 0)




@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, cast(x, y_ptr.dtype.element_ty, UPCAST), mask=offs < n)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # fp16(3.4e38) -> inf, as torch
def test_cast_rounds_to_nearest_even_like_torch():
    """kernels.common.cast must round fp32 -> bf16/fp16 as the GPU and torch do (the
    interpreter's own bf16 cast truncates), NaN and inf included."""
    x = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-3, 4, (1000,)), torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4e38])])
    x = x.to(KERNEL_DEVICE)
    for dt in (torch.bfloat16, torch.float16):
        y = torch.empty(x.numel(), dtype=dt, device=KERNEL_DEVICE)
        _cast_kernel[(1,)](x, y, x.numel(), BLOCK=2048, UPCAST=interpreting())
        expected = x.to(dt)
        same = (y == expected) | (y.isnan() & expected.isnan())
        assert same.all(), f"{dt}: {int((~same).sum())} values differ, e.g. {x[~same][:3].tolist()} -> {y[~same][:3].tolist()} vs {expected[~same][:3].tolist()}"


def test_fp32_dot_precision_follows_torch_setting():
    from lorakern.kernels.common import dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_fused_gemm_override_is_validated(monkeypatch):
    from lorakern import settings

    monkeypatch.setenv("LORAKERN_FUSED_GEMM", "yes")
    before = settings.fused_gemm
    with pytest.raises(ValueError, match="LORAKERN_FUSED_GEMM"):
        settings.reload()
    assert settings.fused_gemm == before  # a bad value changes nothing
    monkeypatch.setenv("LORAKERN_FUSED_GEMM", "0")
    assert settings.read()["fused_gemm"] == "0"


def test_forced_variant(monkeypatch):
    """LORAKERN_FUSED_GEMM forces a variant; "merged" falls back to cuBLAS where a call
    cannot take it (dropout on), never to the fused GEMM."""
    from lorakern import settings
    from lorakern.kernels.dispatch import Dispatcher

    d, cuda = Dispatcher(), torch.device("cuda")
    both = {"fused": None, "unfused": None}
    for value, want, want_both in (("1", "fused", "fused"), ("0", "unfused", "unfused"), ("merged", "merged", "unfused")):
        monkeypatch.setattr(settings, "fused_gemm", value)
        assert d.choose(("k",), {**both, "merged": None}, cuda) == want
        assert d.choose(("k",), both, cuda) == want_both
    assert d.times() == {}  # forced choices measure nothing


def test_measured_dispatch_alternates_keeps_each_best_and_caches(monkeypatch):
    """The CUDA branch of Dispatcher.choose, driven on CPU with a scripted timer: two
    alternating rounds over the candidates, each candidate's best time compared, the
    choice and times recorded once per key; reset() forgets them."""
    import triton.testing

    from lorakern import settings
    from lorakern.kernels import dispatch

    monkeypatch.setattr(settings, "fused_gemm", "auto")
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    order, script = [], {"fused": [5.0, 1.0], "unfused": [2.0, 1.5], "merged": [1.2, 3.0]}

    def fake_bench(fn, warmup, rep):
        name = fn()
        order.append(name)
        return script[name].pop(0)

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    d, cuda = dispatch.Dispatcher(), torch.device("cuda")
    candidates = {name: (lambda name=name: name) for name in ("fused", "unfused", "merged")}
    key = ("fwd", 8192, 4096, 4096)
    # One round alone would pick merged (1.2); the best of two says fused (1.0).
    assert d.choose(key, candidates, cuda) == "fused"
    assert order == ["fused", "unfused", "merged"] * 2
    assert d.times()[key] == {"fused": 1.0, "unfused": 1.5, "merged": 1.2} and d.choices()[key] == "fused"
    assert d.choose(key, candidates, cuda) == "fused"
    assert len(order) == 6  # cached: no second measurement
    # Traced inputs or an unmeasured key inside a capture: cuBLAS, nothing timed or cached.
    assert d.choose(("other",), candidates, cuda, is_traced=True) == "unfused" and len(order) == 6
    d.reset()
    assert d.times() == {}
    script.update({"fused": [9.0, 9.0], "unfused": [2.0, 2.0], "merged": [1.0, 1.0]})
    assert d.choose(key, candidates, cuda) == "merged" and len(order) == 12


def test_measured_dispatch_skips_a_candidate_that_fails(monkeypatch):
    """A candidate that raises while timed (a kernel this card or Triton cannot compile)
    never wins and does not break the call; the unfused one (cuBLAS + pass) must run."""
    import triton.testing

    from lorakern import settings
    from lorakern.kernels import dispatch

    monkeypatch.setattr(settings, "fused_gemm", "auto")
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn())
    calls = []

    def broken():
        calls.append("fused")
        raise RuntimeError("no such instruction on this card")

    d, cuda = dispatch.Dispatcher(), torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="'fused' variant failed"):
        assert d.choose(("k",), {"fused": broken, "unfused": lambda: 2.0, "merged": lambda: 3.0}, cuda) == "unfused"
    assert calls == ["fused"] and d.times()[("k",)]["fused"] == float("inf")
    with pytest.raises(RuntimeError):
        d.choose(("k2",), {"unfused": broken}, cuda)


@pytest.mark.parametrize("r", [100, 128], ids=lambda r: f"r{r}")
def test_ranks_above_64(r):
    """Ranks past the test grid pad to the next power of two in registers."""
    M, dt = 20, torch.float16
    x = randn(M, K, dtype=dt, device=KERNEL_DEVICE)
    A = randn(r, K, dtype=torch.float32, device=KERNEL_DEVICE)
    W = randn(N, K, dtype=dt, device=KERNEL_DEVICE)
    B = randn(N, r, dtype=torch.float32, device=KERNEL_DEVICE)
    S = _kernels().lora_shrink(x, A, 0.1, SEED)
    check_against_oracle(S, reference.lora_shrink(x, A, 0.1, SEED), reference.lora_shrink(x.double(), A.double(), 0.1, SEED), dt, "S")
    y = _kernels().lora_forward_fused(x, W, None, S, B, 0.5)
    oracle = reference.lora_forward(x.double(), W.double(), None, S.double(), B.double(), 0.5)
    check_against_oracle(y, reference.lora_forward(x, W, None, S, B, 0.5), oracle, dt, "y")


@dtype_pairs
@params("M", [0, 1, 7, 16, 130], ids=lambda m: f"M{m}")
@ranks
@ps
@params("has_bias", [True, False], ids=["bias", "nobias"])
@params("cublas_base", [False, True], ids=["triton-base", "cublas-base"])
def test_forward_onepass(dtypes, M, r, p, has_bias, cublas_base):
    """Shrink inside the kernel that adds the B-projection (the small-M forward), with the
    base GEMM in the same kernel or by cuBLAS first: y and S against reference and oracle."""
    dt, adt = dtypes
    x = randn(M, K, dtype=dt, device=KERNEL_DEVICE)
    W = randn(N, K, dtype=dt, device=KERNEL_DEVICE)
    bias = randn(N, dtype=dt, device=KERNEL_DEVICE) if has_bias else None
    A = randn(r, K, dtype=adt, device=KERNEL_DEVICE)
    B = randn(N, r, dtype=adt, device=KERNEL_DEVICE)
    y, S = poisoned(lambda: _kernels().lora_forward_onepass(x, W, bias, A, B, 0.5, p, SEED, cublas_base=cublas_base))
    assert y.dtype == dt and S.dtype == torch.float32
    y_ref, S_ref = reference.lora_linear_forward(x, W, bias, A, B, 0.5, p, SEED)
    b64 = None if bias is None else bias.double()
    y_64, S_64 = reference.lora_linear_forward(x.double(), W.double(), b64, A.double(), B.double(), 0.5, p, SEED)
    check_against_oracle(S, S_ref, S_64, dt, "S")
    check_against_oracle(y, y_ref, y_64, dt, "y")


@dtype_pairs
@params("p", [0.0, 0.3], ids=["p0", "p0.3"])
@params("M", [0, 5, 16], ids=lambda m: f"M{m}")
@params("cublas_base", [False, True], ids=["triton-base", "cublas-base"])
def test_onepass_without_S_gives_the_same_y(dtypes, cublas_base, M, p):
    """need_S=False (inference): S is neither allocated nor stored, y is bit-identical."""
    dt, adt = dtypes
    x = randn(M, K, dtype=dt, device=KERNEL_DEVICE)
    W, bias = randn(N, K, dtype=dt, device=KERNEL_DEVICE), randn(N, dtype=dt, device=KERNEL_DEVICE)
    A, B = randn(4, K, dtype=adt, device=KERNEL_DEVICE), randn(N, 4, dtype=adt, device=KERNEL_DEVICE)
    y, S = _kernels().lora_forward_onepass(x, W, bias, A, B, 0.5, p, SEED, cublas_base=cublas_base)
    y2, S2 = _kernels().lora_forward_onepass(x, W, bias, A, B, 0.5, p, SEED, cublas_base=cublas_base, need_S=False)
    assert S2 is None and S is not None and torch.equal(y2, y)


@params("cublas_base", [False, True], ids=["triton-base", "cublas-base"])
def test_onepass_mask_is_the_shrink_mask(cublas_base):
    """The small-M forward applies exactly the shrink kernel's dropout mask."""
    M, Kx, p = 5, 64, 0.4
    x = torch.ones(M, Kx, device=KERNEL_DEVICE)
    eye = torch.eye(Kx, device=KERNEL_DEVICE)
    W = torch.zeros(3, Kx, device=KERNEL_DEVICE)
    zeros = torch.zeros(3, Kx, device=KERNEL_DEVICE)
    _, S = _kernels().lora_forward_onepass(x, W, None, eye, zeros, 1.0, p, 321, cublas_base=cublas_base)
    assert torch.equal((S != 0).cpu(), reference.dropout_keep_mask(321, M, Kx, p))


@pytest.mark.parametrize("r", [16, 64, 128], ids=lambda r: f"r{r}")
def test_dsdb_gpu_row_blocks(monkeypatch, r):
    """The GPU configs of the dS/dB pass (BLOCK_M 64/128/256 chosen by r), run here in
    the interpreter: partial buffers of every size still sum to the reference."""
    from lorakern.kernels import backward

    monkeypatch.setattr(backward, "interpreting", lambda: False)
    M, dt = 300, torch.bfloat16
    cfg = backward._dsdb_config(M, r, 2)
    assert cfg["BLOCK_M"] == {16: 64, 64: 128, 128: 256}[r]
    dy = randn(M, N, dtype=dt, device=KERNEL_DEVICE)
    B = randn(N, r, dtype=torch.float32, device=KERNEL_DEVICE)
    S = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    dS, dB = _kernels().lora_backward_dsdb(dy, B, S, 0.5)
    dS_ref, dB_ref = reference.lora_backward_dsdb(dy, B, S, 0.5)
    dS_64, dB_64 = reference.lora_backward_dsdb(dy.double(), B.double(), S.double(), 0.5)
    check_against_oracle(dS, dS_ref, dS_64, dt, "dS")
    check_against_oracle(dB, dB_ref, dB_64, dt, "dB")


def test_shrink_and_da_gpu_blocks(monkeypatch):
    """The GPU block sizes of shrink and dA (BLOCK_K 128, dA split over M for ~264
    programs), run here in the interpreter with dropout on."""
    from lorakern.kernels import backward, shrink

    monkeypatch.setattr(shrink, "interpreting", lambda: False)
    monkeypatch.setattr(backward, "interpreting", lambda: False)
    M, Kx, r, p, dt = 700, 300, 16, 0.1, torch.bfloat16
    x = randn(M, Kx, dtype=dt, device=KERNEL_DEVICE)
    A = randn(r, Kx, dtype=torch.float32, device=KERNEL_DEVICE)
    dS = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    S = _kernels().lora_shrink(x, A, p, SEED)
    check_against_oracle(S, reference.lora_shrink(x, A, p, SEED), reference.lora_shrink(x.double(), A.double(), p, SEED), dt, "S")
    dA = _kernels().lora_backward_da(dS, x, A, p, SEED)
    oracle = reference.lora_backward_da(dS.double(), x.double(), A.double(), p, SEED)
    check_against_oracle(dA, reference.lora_backward_da(dS, x, A, p, SEED), oracle, dt, "dA")


@pytest.mark.parametrize("tile", [(128, 256, 64), (256, 128, 64), (16, 128, 128), (64, 64, 64)], ids=lambda t: "x".join(map(str, t)))
def test_gemms_at_gpu_tiles(monkeypatch, tile):
    """The forward (fused and one-pass) and dx GEMMs at GPU tile shapes, in the
    interpreter: each tile's masking and grouped ordering on ragged M, N, K."""
    from lorakern.kernels import backward, forward

    bm, bc, br = tile
    fwd_cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bc, "BLOCK_K": br, "GROUP_M": 8}, num_warps=4)
    dx_cfg = triton.Config({"BLOCK_M": bm, "BLOCK_K": bc, "BLOCK_N": br, "GROUP_M": 8}, num_warps=4)
    monkeypatch.setattr(forward._lora_fwd_kernel_tuned, "configs", [fwd_cfg])
    monkeypatch.setattr(forward._lora_fwd_kernel_tuned, "cache", {})
    monkeypatch.setattr(backward._lora_bwd_dx_kernel_tuned, "configs", [dx_cfg])
    monkeypatch.setattr(backward._lora_bwd_dx_kernel_tuned, "cache", {})
    M, Kx, Nx, r, p, dt = 150, 200, 300, 7, 0.1, torch.float16
    x, W = randn(M, Kx, dtype=dt, device=KERNEL_DEVICE), randn(Nx, Kx, dtype=dt, device=KERNEL_DEVICE)
    bias = randn(Nx, dtype=dt, device=KERNEL_DEVICE)
    A, B = randn(r, Kx, dtype=torch.float32, device=KERNEL_DEVICE), randn(Nx, r, dtype=torch.float32, device=KERNEL_DEVICE)
    S = reference.lora_shrink(x, A, p, SEED)
    y = _kernels().lora_forward_fused(x, W, bias, S, B, 0.5)
    y64 = reference.lora_forward(x.double(), W.double(), bias.double(), S.double(), B.double(), 0.5)
    check_against_oracle(y, reference.lora_forward(x, W, bias, S, B, 0.5), y64, dt, "y")
    y1, S1 = _kernels().lora_forward_onepass(x, W, bias, A, B, 0.5, p, SEED)
    y1_64, S1_64 = reference.lora_linear_forward(x.double(), W.double(), bias.double(), A.double(), B.double(), 0.5, p, SEED)
    check_against_oracle(S1, S, S1_64, dt, "S (one-pass)")
    check_against_oracle(y1, reference.lora_linear_forward(x, W, bias, A, B, 0.5, p, SEED)[0], y1_64, dt, "y (one-pass)")
    dy = randn(M, Nx, dtype=dt, device=KERNEL_DEVICE)
    dS = randn(M, r, dtype=torch.float32, device=KERNEL_DEVICE)
    dx = _kernels().lora_backward_dx(dy, W, dS, A, p, SEED, fused=True)
    dx64 = reference.lora_backward_dx(dy.double(), W.double(), dS.double(), A.double(), p, SEED)
    check_against_oracle(dx, reference.lora_backward_dx(dy, W, dS, A, p, SEED), dx64, dt, "dx")


# ----------------------------------------------------------------------------- scalars in memory


@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_scalars_in_device_memory_match_by_value_bit_for_bit(dt, p):
    """Each launcher given a DeviceScalars (the traced triton_op path: scaling, p, 1/(1-p)
    and the seed loaded by the kernels) returns exactly what it returns with the same
    values passed by value: same mask, same rounding of s and 1/(1-p)."""
    from lorakern.kernels.common import to_device_scalars

    k = _kernels()
    M, r, s, seed = 70, 7, 0.37, 2**40 + 5
    dev = KERNEL_DEVICE
    x, dy = randn(M, K, dtype=dt, device=dev), randn(M, N, dtype=dt, device=dev)
    W, bias = randn(N, K, dtype=dt, device=dev), randn(N, dtype=dt, device=dev)
    A, B = randn(r, K, dtype=torch.float32, device=dev), randn(N, r, dtype=torch.float32, device=dev)
    mem = to_device_scalars(s, p, seed, dev)
    S = k.lora_shrink(x, A, p, seed)
    dS, dB = k.lora_backward_dsdb(dy, B, S, s)
    pairs = {
        "shrink": (S, k.lora_shrink(x, A, mem, mem)),
        "onepass": (k.lora_forward_onepass(x, W, bias, A, B, s, p, seed), k.lora_forward_onepass(x, W, bias, A, B, mem, mem, mem)),
        "fused": (k.lora_forward_fused(x, W, bias, S, B, s), k.lora_forward_fused(x, W, bias, S, B, mem)),
        "unfused": (k.lora_forward_unfused(x, W, bias, S, B, s), k.lora_forward_unfused(x, W, bias, S, B, mem)),
        "lora only": (k.lora_forward_unfused(x, None, None, S, B, s), k.lora_forward_unfused(x, None, None, S, B, mem)),
        "dsdb": ((dS, dB), k.lora_backward_dsdb(dy, B, S, mem)),
        "dx fused": (k.lora_backward_dx(dy, W, dS, A, p, seed), k.lora_backward_dx(dy, W, dS, A, mem, mem)),
        "dx unfused": (k.lora_backward_dx(dy, W, dS, A, p, seed, fused=False), k.lora_backward_dx(dy, W, dS, A, mem, mem, fused=False)),
        "dA": (k.lora_backward_da(dS, x, A, p, seed), k.lora_backward_da(dS, x, A, mem, mem)),
        "forward": (k.lora_linear_forward(x, W, bias, A, B, s, p, seed), k.lora_linear_forward(x, W, bias, A, B, mem, mem, mem)),
        "backward": (
            k.lora_linear_backward(dy, x, W, A, B, S, s, p, seed, (True, True, True)),
            k.lora_linear_backward(dy, x, W, A, B, S, mem, mem, mem, (True, True, True)),
        ),
    }
    for name, (by_value, in_memory) in pairs.items():
        for a, b in zip(torch.utils._pytree.tree_leaves(by_value), torch.utils._pytree.tree_leaves(in_memory)):
            assert torch.equal(a, b), f"{name}: in-memory scalars differ from by-value (max {(a - b).abs().max()})"
    if p > 0.0:  # the mask is really applied in memory mode: another seed changes S
        other = to_device_scalars(s, p, seed + 1, dev)
        assert not torch.equal(S, k.lora_shrink(x, A, other, other))


def test_device_scalars_must_not_be_mixed_with_values():
    """One DeviceScalars is passed as scaling, p and seed together (or as scaling with
    p=0.0); a by-value p beside an in-memory seed would silently use the wrong mask."""
    from lorakern.kernels.common import scalar_args, to_device_scalars

    mem = to_device_scalars(0.5, 0.2, 7, "cpu")
    assert scalar_args(mem, mem, mem)["SCALARS_IN_MEMORY"] is True
    assert scalar_args(0.0, 0, mem)["HAS_DROPOUT"] is False
    for p, seed, scaling in ((0.2, mem, None), (mem, 7, None), (0.2, 7, mem), (mem, mem, 0.5)):
        with pytest.raises(TypeError, match="DeviceScalars"):
            scalar_args(p, seed, scaling)


@pytest.mark.parametrize("shapes", [((3, 5, 7), (4, 2, 9)), ((1, 40, 16), (130, 16, 33)), ((2, 0, 4), (5, 3, 3))],
                         ids=["small", "one-vs-many", "empty"])
def test_sum_partials_sums_both_stacks_in_one_launch(shapes):
    """The backward's dB and dA partials [P, ...] summed in fp32 and cast once, in one launch;
    equal to torch's sum up to fp32 reassociation, NaN-poisoned outputs fully written."""
    from lorakern.kernels.backward import sum_partials

    (a_shape, b_shape) = shapes
    a = torch.randn(*a_shape, device=KERNEL_DEVICE)
    b = torch.randn(*b_shape, device=KERNEL_DEVICE)
    out_a, out_b = sum_partials(a, torch.bfloat16, b, torch.float32)
    assert out_a.dtype == torch.bfloat16 and out_a.shape == a_shape[1:]
    assert out_b.dtype == torch.float32 and out_b.shape == b_shape[1:]
    in_order = torch.zeros(a_shape[1:], device=KERNEL_DEVICE)
    for part in a:  # the kernel's order: partial 0, 1, ... added in fp32, then one rounding
        in_order += part
    torch.testing.assert_close(out_a, in_order.to(torch.bfloat16), rtol=0, atol=0)
    # Summed in order in fp32: within the recursive-summation bound (P - 1)·u·Σ|terms| of the exact sum.
    bound = (b.shape[0] - 1) * 2**-24 * b.double().abs().sum(0)
    assert ((out_b.double() - b.double().sum(0)).abs() <= bound + 1e-30).all()
    with pytest.raises(ValueError, match="b_partial"):
        sum_partials(a, torch.float32, b.transpose(1, 2), torch.float32)
