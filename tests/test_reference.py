"""The pure-PyTorch reference path: gradcheck, the naive formula, per-kernel functions, dropout.

Everything here runs on CPU with backend="reference". The oracle is always an fp64
computation written out naively in this file (fla's `naive.py` idea), so the
reference is checked against something that shares none of its code.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lorakern import lora_linear, reference
from lorakern.ops import LoraLinearFunction, interpreting
from tests.conftest import HAS_CUDA, requires_triton
from tests.utils import RTOL, assert_close

# ----------------------------------------------------------------------------- helpers


def naive_lora_linear(x, weight, bias, lora_A, lora_B, scaling, p=0.0, seed=0):
    """x Wᵀ + bias + s·(dropout(x) Aᵀ) Bᵀ, written out; dropout uses the seeded mask."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if p > 0.0:
        keep = reference.dropout_keep_mask(seed, x2.shape[0], k, p).to(x.dtype)
        xd = x2 * keep / (1.0 - p)
    else:
        xd = x2
    y = x2 @ weight.t() + scaling * (xd @ lora_A.t()) @ lora_B.t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def keep_or_ones(seed: int, m: int, k: int, p: float) -> torch.Tensor:
    """The keep mask as fp64 0/1 (all ones when p == 0)."""
    if p == 0.0:
        return torch.ones(m, k, dtype=torch.float64)
    return reference.dropout_keep_mask(seed, m, k, p).double()


def make_inputs(lead, k, n, r, dtype=torch.float64, adapter_dtype=None, bias=True):
    """x [*lead, K], weight [N, K], bias [N], lora_A [r, K], lora_B [N, r]; randn, never zeros."""
    adapter_dtype = dtype if adapter_dtype is None else adapter_dtype
    x = torch.randn(*lead, k, dtype=dtype)
    weight = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    lora_A = (torch.randn(r, k) / math.sqrt(k)).to(adapter_dtype)
    lora_B = torch.randn(n, r, dtype=adapter_dtype)
    return x, weight, b, lora_A, lora_B


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_gradcheck_lora_linear(lead, bias, p):
    x, w, b, A, B = make_inputs(lead, 7, 5, 3, bias=bias)
    inputs = [t.requires_grad_() for t in (x, w, b, A, B) if t is not None]

    def f(x, w, *rest):
        b = rest[0] if bias else None
        A, B = rest[-2:]
        return lora_linear(x, w, b, A, B, 0.75, dropout_p=p, seed=1234, backend="reference")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_function_direct():
    """LoraLinearFunction itself (2-D x), dropout on, every differentiable input."""
    x, w, b, A, B = make_inputs((6,), 5, 3, 2)
    inputs = [t.requires_grad_() for t in (x, w, b, A, B)]

    def f(x, w, b, A, B):
        return LoraLinearFunction.apply(x, w, b, A, B, 1.5, 0.3, 77, "reference")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------- naive formula


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(1,), (13,), (3, 11)], ids=["M1", "M13", "3d"])
def test_matches_naive_formula_fp64(lead, bias, p):
    """Forward and every gradient (x, W, bias, A, B) against the naive formula, fp64."""
    seed = 987654321
    x, w, b, A, B = make_inputs(lead, 19, 23, 5, bias=bias)
    leaves = [t.requires_grad_() for t in (x, w, b, A, B) if t is not None]
    y = lora_linear(x, w, b, A, B, 0.6, dropout_p=p, seed=seed, backend="reference")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)

    clones = [t.detach().clone().requires_grad_() for t in leaves]
    xc, wc = clones[0], clones[1]
    bc = clones[2] if bias else None
    Ac, Bc = clones[-2:]
    y_ref = naive_lora_linear(xc, wc, bc, Ac, Bc, 0.6, p, seed)
    grads_ref = torch.autograd.grad(y_ref, clones, dy)

    assert_close(y, y_ref, RTOL[torch.float64], "y")
    names = ["dx", "dW"] + (["dbias"] if bias else []) + ["dA", "dB"]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == torch.float64, name
        assert_close(g, g_ref, RTOL[torch.float64], name)


# ----------------------------------------------------------------------------- per-kernel functions

K_ODD, N_ODD = 37, 29
MR = [(m, r) for m in (0, 1, 7, 130) for r in (1, 7, 16, 64)]
MR_IDS = [f"M{m}-r{r}" for m, r in MR]
# (x dtype, adapter dtype): same dtype, and PEFT's fp32 adapters on a bf16 base.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
DTYPE_IDS = ["fp32", "fp16", "bf16", "bf16-adapters-fp32"]
SEED = 2024


def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("m", "r"), MR, ids=MR_IDS)
def test_lora_shrink(m, r, dtypes, p):
    dtype, adtype = dtypes
    x, _, _, A, _ = make_inputs((m,), K_ODD, N_ODD, r, dtype, adtype)
    S = reference.lora_shrink(x, A, p, SEED)
    assert S.dtype == torch.float32 and S.shape == (m, r)
    keep = keep_or_ones(SEED, m, K_ODD, p)
    S_ref = (_d(x) * keep / (1.0 - p)) @ _d(A).t()
    assert_close(S, S_ref, RTOL[dtype], "S")
    # A mask passed in is used as given: the regenerated one gives the same bits.
    if p > 0.0:
        given = reference.lora_shrink(x, A, p, SEED, keep=reference.dropout_keep_mask(SEED, m, K_ODD, p))
        assert torch.equal(given, S)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("m", "r"), MR, ids=MR_IDS)
def test_lora_forward(m, r, dtypes, bias):
    dtype, adtype = dtypes
    x, w, b, _, B = make_inputs((m,), K_ODD, N_ODD, r, dtype, adtype, bias=bias)
    S = torch.randn(m, r, dtype=torch.float32)
    y = reference.lora_forward(x, w, b, S, B, 0.5)
    assert y.dtype == dtype and y.shape == (m, N_ODD)
    y_ref = _d(x) @ _d(w).t() + 0.5 * _d(S) @ _d(B).t()
    if bias:
        y_ref = y_ref + _d(b)
    assert_close(y, y_ref, RTOL[dtype], "y")


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("m", "r"), MR, ids=MR_IDS)
def test_lora_backward_dsdb(m, r, dtypes):
    dtype, adtype = dtypes
    B = torch.randn(N_ODD, r, dtype=adtype)
    S = torch.randn(m, r, dtype=torch.float32)
    dy = torch.randn(m, N_ODD, dtype=dtype)
    dS, dB = reference.lora_backward_dsdb(dy, B, S, 1.25)
    assert dS.dtype == torch.float32 and dS.shape == (m, r)
    assert dB.dtype == adtype and dB.shape == (N_ODD, r)
    assert_close(dS, 1.25 * _d(dy) @ _d(B), RTOL[dtype], "dS")
    assert_close(dB, 1.25 * _d(dy).t() @ _d(S), RTOL[dtype], "dB")
    if m == 0:
        assert torch.count_nonzero(dB) == 0


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("m", "r"), MR, ids=MR_IDS)
def test_lora_backward_dx(m, r, dtypes, p):
    dtype, adtype = dtypes
    _, w, _, A, _ = make_inputs((m,), K_ODD, N_ODD, r, dtype, adtype)
    dy = torch.randn(m, N_ODD, dtype=dtype)
    dS = torch.randn(m, r, dtype=torch.float32)
    dx = reference.lora_backward_dx(dy, w, dS, A, p, SEED)
    assert dx.dtype == dtype and dx.shape == (m, K_ODD)
    keep = keep_or_ones(SEED, m, K_ODD, p)
    dx_ref = _d(dy) @ _d(w) + keep * (_d(dS) @ _d(A)) / (1.0 - p)
    assert_close(dx, dx_ref, RTOL[dtype], "dx")


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("m", "r"), MR, ids=MR_IDS)
def test_lora_backward_da(m, r, dtypes, p):
    dtype, adtype = dtypes
    x, _, _, A, _ = make_inputs((m,), K_ODD, N_ODD, r, dtype, adtype)
    dS = torch.randn(m, r, dtype=torch.float32)
    dA = reference.lora_backward_da(dS, x, A, p, SEED)
    assert dA.dtype == adtype and dA.shape == (r, K_ODD)
    keep = keep_or_ones(SEED, m, K_ODD, p)
    dA_ref = _d(dS).t() @ (_d(x) * keep / (1.0 - p))
    assert_close(dA, dA_ref, RTOL[dtype], "dA")
    if m == 0:
        assert torch.count_nonzero(dA) == 0


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("base", ["weight", "no-weight", "scaling-0"])
def test_whole_forward_backward_compose_the_kernels(p, needs, dtype, base):
    """lora_linear_forward / _backward equal the per-kernel functions chained, bit for bit,
    None where not needed. fp32 / fp64 with p = 0 take the spelled-out products (the CPU
    path's host time); they must not change a bit either, with or without a base weight,
    at scaling 0 (where the forward keeps the general path: NaN propagation) too."""
    x, w, b, A, B = make_inputs((9,), K_ODD, N_ODD, 7, dtype)
    if base == "no-weight":
        w, b = None, None
    s = 0.0 if base == "scaling-0" else 0.5
    y, S = reference.lora_linear_forward(x, w, b, A, B, s, p, SEED)
    assert torch.equal(S, reference.lora_shrink(x, A, p, SEED))
    assert torch.equal(y, reference.lora_forward(x, w, b, S, B, s))
    dy = torch.randn_like(y)
    dx, dA, dB = reference.lora_linear_backward(dy, x, w, A, B, S, s, p, SEED, needs)
    dS, dB_ref = reference.lora_backward_dsdb(dy, B, S, s)
    expected = (
        reference.lora_backward_dx(dy, w, dS, A, p, SEED),
        reference.lora_backward_da(dS, x, A, p, SEED),
        dB_ref,
    )
    for name, need, got, exp in zip(("dx", "dA", "dB"), needs, (dx, dA, dB), expected, strict=True):
        if need:
            assert torch.equal(got, exp), name
        else:
            assert got is None, name


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**63 - 1])
def test_philox_uniform_in_unit_interval(seed):
    # Offsets past 2**32 exercise the high counter word.
    offs = torch.cat([torch.arange(50_000), torch.arange(2**32 - 25_000, 2**32 + 25_000)])
    u = reference.philox_uniform(seed, offs)
    assert u.dtype == torch.float32 and u.shape == offs.shape
    assert bool((u >= 0).all()) and bool((u < 1).all())
    # Spread over the whole interval, mean 1/2 within 5σ (σ = sqrt(1/12 / n)).
    assert u.min().item() < 1e-3 and u.max().item() > 1 - 1e-3
    assert abs(u.double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / offs.numel())


def test_philox_largest_draw_maps_below_one():
    """The fold-and-scale step sends the largest possible 31-bit value strictly below 1."""
    largest = torch.tensor([2**31 - 1], dtype=torch.int64).to(torch.float32)
    assert (largest * torch.tensor(reference._UNIFORM_SCALE, dtype=torch.float32)).item() < 1.0


@functools.cache
def _tl_rand_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.rand(seed, offs), mask=offs < n)

    @triton.jit
    def randint4x_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, offs)
        mask = offs < n
        tl.store(out_ptr + offs, r0.to(tl.int64), mask=mask)
        tl.store(out_ptr + n + offs, r1.to(tl.int64), mask=mask)
        tl.store(out_ptr + 2 * n + offs, r2.to(tl.int64), mask=mask)
        tl.store(out_ptr + 3 * n + offs, r3.to(tl.int64), mask=mask)

    return rand_kernel, randint4x_kernel


@requires_triton
@pytest.mark.skipif(not (HAS_CUDA or interpreting()), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 3])
def test_philox_bit_identical_to_triton(seed):
    """The reference's Philox reproduces Triton's tl.rand and tl.randint4x bit for bit."""
    n = 3000
    device = "cuda" if HAS_CUDA else "cpu"
    rand_kernel, randint4x_kernel = _tl_rand_kernels()
    out = torch.full((n,), float("nan"), device=device)
    rand_kernel[(-(-n // 1024),)](out, seed, n, BLOCK=1024)
    assert torch.equal(out.cpu(), reference.philox_uniform(seed, torch.arange(n)))
    lanes = torch.full((4 * n,), -1, dtype=torch.int64, device=device)
    randint4x_kernel[(-(-n // 1024),)](lanes, seed, n, BLOCK=1024)
    ref = torch.stack(reference.philox4x32(seed, torch.arange(n)))
    # Triton's lanes are uint32; compare the low 32 bits whatever the int64 cast did.
    assert torch.equal(lanes.cpu().view(4, n) & 0xFFFFFFFF, ref)


def _keep_mask_by_definition(seed: int, m: int, k: int, p: float) -> torch.Tensor:
    """Element (i, j) keeps iff lane j % 4 of Philox at counter i*ceil(k/4) + j//4, as a uniform, is > p."""
    groups = -(-k // 4)
    i = torch.arange(m).view(m, 1)
    j = torch.arange(k).view(1, k)
    counters = (i * groups + j // 4).reshape(-1)
    lanes = torch.stack(reference.philox4x32(seed, counters), dim=-1)  # [m*k, 4]
    u = reference.uint_to_uniform(lanes.gather(1, (j % 4).expand(m, k).reshape(-1, 1)))
    return (u > torch.tensor(p, dtype=torch.float32)).view(m, k)


@pytest.mark.parametrize("k", [1, 4, 50, 67])
def test_keep_mask_layout_and_chunking(monkeypatch, k):
    """Element (i, j) takes lane j % 4 of the Philox call at counter i*ceil(k/4) + j//4,
    also across the generator's chunk boundaries (k not a multiple of 4)."""
    m, p = 60, 0.3
    direct = _keep_mask_by_definition(77, m, k, p)
    monkeypatch.setattr(reference, "_CHUNK", 7 * 13 + 3)  # odd chunk: boundaries mid-matrix
    keep = reference.dropout_keep_mask(77, m, k, p)
    assert keep.dtype == torch.bool and keep.shape == (m, k)
    assert torch.equal(keep, direct)


@pytest.mark.parametrize("p", [1e-9, 0.05, 0.5, 0.999999, 1 - 2**-30])
@pytest.mark.parametrize("seed", [0, 2**40 + 3, 2**63 - 1])
def test_keep_mask_threshold_matches_the_float_comparison(seed, p):
    """The generator tests `uniform > p` as an integer range check on the raw Philox word;
    it must agree with the fp32 comparison everywhere, at extreme p too."""
    m, k = 37, 53
    assert torch.equal(reference.dropout_keep_mask(seed, m, k, p), _keep_mask_by_definition(seed, m, k, p))


@pytest.mark.skipif(not reference.compiled_mask_generator(), reason="the C mask generator is not built")
@pytest.mark.parametrize("p", [1e-9, 0.1, 0.5, 0.999999])
@pytest.mark.parametrize("m, k", [(1, 1), (3, 7), (130, 64), (33, 1031)])
def test_compiled_and_numpy_mask_generators_agree(monkeypatch, m, k, p):
    """lorakern/_philox.c and the numpy fallback give the same bits (the numpy one is
    checked against the by-definition float comparison above)."""
    for seed in (0, 77, 2**40 + 3, 2**63 - 1):
        compiled = reference.dropout_keep_mask(seed, m, k, p)
        with monkeypatch.context() as mp:
            mp.setattr(reference, "_philox", None)
            assert torch.equal(compiled, reference.dropout_keep_mask(seed, m, k, p)), (seed, m, k, p)


@pytest.mark.skipif(not reference.compiled_mask_generator(), reason="the C mask generator is not built")
@pytest.mark.parametrize("counter0", [0, 2**32 - 9, 2**33 - 3, 2**40 - 5])
def test_compiled_float_masks_are_the_bits(counter0):
    """keep_values writes the keep bits as float32 (the AVX2 path, 16 counters a step, where
    the CPU has it) and float64: the values of the scalar byte path, for counts around the
    vector widths and counters whose low word wraps inside a block."""
    import numpy as np

    ext = pytest.importorskip("lorakern._philox")
    for seed in (0, 77, 2**40 + 3, 2**63 - 1):
        for threshold in (1, 100_000_000, 2**31 - 1):
            for n in (0, 1, 7, 8, 15, 16, 17, 31, 33, 100):
                bits = np.empty(4 * n, dtype=np.bool_)
                ext.keep_bits(seed, counter0, n, threshold, bits)
                for dtype in (np.uint8, np.float32, np.float64):
                    out = np.full(4 * n, 7, dtype=dtype)
                    ext.keep_values(seed, counter0, n, threshold, out, out.itemsize)
                    assert (out == bits).all(), (seed, counter0, n, threshold, dtype, ext.AVX2)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, k", [(1, 1), (3, 7), (130, 1031)])
def test_float_keep_mask_is_the_bool_mask(monkeypatch, compiled, dtype, m, k):
    """The multiplied mask (`_keep`: 1 / 0 in x's dtype, written as floats by the generator,
    a view past the padding columns; several chunks at 130 x 1031) is dropout_keep_mask."""
    if compiled and not reference.compiled_mask_generator():
        pytest.skip("the C mask generator is not built")
    want = reference.dropout_keep_mask(1234, m, k, 0.3)
    if not compiled:
        monkeypatch.setattr(reference, "_philox", None)
    keep = reference._keep(torch.zeros(m, k, dtype=dtype), 0.3, 1234)
    assert keep.dtype == dtype and keep.shape == (m, k)
    assert torch.equal(keep, want.to(dtype))


def test_compiled_mask_generator_rejects_bad_arguments():
    ext = pytest.importorskip("lorakern._philox")
    import numpy as np

    with pytest.raises(ValueError, match="need 4 \\* n"):
        ext.keep_bits(1, 0, 3, 5, np.empty(11, dtype=np.bool_))
    with pytest.raises(ValueError, match="threshold"):
        ext.keep_bits(1, 0, 1, 0, np.empty(4, dtype=np.bool_))
    with pytest.raises(TypeError):
        ext.keep_bits(1, 0, 1, 5, bytes(4))  # read-only buffer
    with pytest.raises(ValueError, match="itemsize must be 1, 4 or 8"):
        ext.keep_values(1, 0, 1, 5, np.empty(8, dtype=np.uint16), 2)
    with pytest.raises(ValueError, match="need 4 \\* n \\* itemsize"):
        ext.keep_values(1, 0, 3, 5, np.empty(8, dtype=np.float32), 4)  # 32 bytes, not 48


def test_keep_threshold_is_the_first_value_above_p():
    scale = torch.tensor(reference._UNIFORM_SCALE, dtype=torch.float32)
    for p in (1e-9, 0.1, 1 / 3, 0.9):
        t = reference._keep_threshold(p)
        around = torch.arange(t - 3, t + 3).to(torch.float32) * scale
        assert torch.equal(around > torch.tensor(p, dtype=torch.float32), torch.arange(t - 3, t + 3) >= t)
    assert reference._keep_threshold(1.0) == 2**31  # nothing is kept


def test_philox_uniform_is_lane_zero():
    offs = torch.arange(1000) * 7919
    lanes = reference.philox4x32(5, offs)
    assert torch.equal(reference.philox_uniform(5, offs), reference.uint_to_uniform(lanes[0]))
    for lane in lanes:
        assert bool((lane >= 0).all()) and bool((lane < 2**32).all())
    # The four lanes are different streams.
    assert len({tuple(lane[:8].tolist()) for lane in lanes}) == 4


def test_dropout_function_is_inverted_dropout():
    x = torch.randn(40, 30, dtype=torch.float64)
    keep = reference.dropout_keep_mask(5, 40, 30, 0.4)
    out = reference.dropout(x, 0.4, 5)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    assert torch.allclose(out[keep], x[keep] / 0.6, rtol=0, atol=0)
    assert reference.dropout(x, 0.0, 5) is x


def test_same_seed_bit_identical_mask():
    a = reference.dropout_keep_mask(31337, 70, 90, 0.3)
    b = reference.dropout_keep_mask(31337, 70, 90, 0.3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_different_seeds_different_masks(p):
    m, k = 100, 100
    a = reference.dropout_keep_mask(1, m, k, p)
    b = reference.dropout_keep_mask(2, m, k, p)
    # Independent masks disagree at rate 2p(1-p); check it within 5σ.
    n = m * k
    q = 2 * p * (1 - p)
    disagree = (a != b).sum().item()
    assert abs(disagree - n * q) <= 5 * math.sqrt(n * q * (1 - q))


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 424242])
def test_keep_rate_binomial_band(p, seed):
    m, k = 317, 331  # ~1.05e5 elements
    keep = reference.dropout_keep_mask(seed, m, k, p)
    n = m * k
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(keep.sum().item() - n * (1 - p)) <= 5 * sigma
    # No drift along the index: each half keeps at the same rate (5σ each).
    for half in (keep[: m // 2], keep[m // 2 :]):
        nh = half.numel()
        assert abs(half.sum().item() - nh * (1 - p)) <= 5 * math.sqrt(nh * p * (1 - p))


def _run_op(x, w, b, A, B, p, seed):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, A, B)]
    y = lora_linear(*leaves, 0.8, dropout_p=p, seed=seed, backend="reference")
    y.backward(torch.ones_like(y))
    return y.detach(), [t.grad for t in leaves]


def test_same_seed_same_output_and_grads():
    x, w, b, A, B = make_inputs((4, 9), 21, 17, 6, torch.float32)
    y1, g1 = _run_op(x, w, b, A, B, 0.3, 99)
    y2, g2 = _run_op(x, w, b, A, B, 0.3, 99)
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)
    # A different seed changes the output (B is non-zero): the seed really is used.
    y3, _ = _run_op(x, w, b, A, B, 0.3, 100)
    assert not torch.equal(y1, y3)


def test_manual_seed_makes_seed_none_reproducible():
    x, w, b, A, B = make_inputs((8,), 21, 17, 6, torch.float32)
    torch.manual_seed(123)
    y1, g1 = _run_op(x, w, b, A, B, 0.5, None)
    torch.manual_seed(123)
    y2, g2 = _run_op(x, w, b, A, B, 0.5, None)
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)
    # Without re-seeding, the next call draws another seed, hence another mask.
    y3, _ = _run_op(x, w, b, A, B, 0.5, None)
    assert not torch.equal(y1, y3)


def test_backward_uses_forward_mask():
    """Grads equal the naive formula's with the mask rebuilt from the same seed, not another one."""
    seed, p = 4242, 0.4
    x, w, b, A, B = make_inputs((12,), 15, 11, 4)
    y, (dx, dw, db, dA, dB) = _run_op(x, w, b, A, B, p, seed)
    for s, must_match in ((seed, True), (seed + 1, False)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, A, B)]
        y_ref = naive_lora_linear(*leaves, 0.8, p, s)
        y_ref.backward(torch.ones_like(y_ref))
        if must_match:
            assert_close(y, y_ref, RTOL[torch.float64], "y")
            for name, g, ref in zip(("dx", "dA", "dB"), (dx, dA, dB), (leaves[0].grad, leaves[3].grad, leaves[4].grad), strict=True):
                assert_close(g, ref, RTOL[torch.float64], name)
        else:
            assert not torch.allclose(dA, leaves[3].grad)
            assert not torch.allclose(dx, leaves[0].grad)


def test_dropped_non_finite_element_propagates_like_torch_dropout():
    """D(x) multiplies by the mask, as torch's dropout does: a dropped finite element is
    exactly 0, a dropped inf/NaN becomes NaN (non-finite inputs are never hidden)."""
    m, k, r, p, seed = 6, 10, 3, 0.5, 21
    keep = reference.dropout_keep_mask(seed, m, k, p)
    (i_drop, j_drop), (i_keep, j_keep) = (~keep).nonzero()[0].tolist(), keep.nonzero()[-1].tolist()
    assert i_drop != i_keep
    x = torch.randn(m, k)
    x[i_drop, j_drop] = float("inf")
    x[i_keep, j_keep] = float("nan")
    A = torch.randn(r, k)
    d = reference.dropout(x, p, seed)
    assert torch.isnan(d[i_drop, j_drop]) and torch.isnan(d[i_keep, j_keep])
    finite = torch.isfinite(x)
    assert torch.equal(d[finite & ~keep], torch.zeros_like(d[finite & ~keep]))
    # torch's own inverted dropout with this mask gives the same non-finite pattern.
    assert torch.equal(torch.isnan(x * keep / (1 - p)), torch.isnan(d))
    S = reference.lora_shrink(x, A, p, seed)
    assert torch.isnan(S[i_drop]).all() and torch.isnan(S[i_keep]).all()
    others = [i for i in range(m) if i not in (i_drop, i_keep)]
    assert torch.isfinite(S[others]).all()
    dS = torch.randn(m, r)
    dA = reference.lora_backward_da(dS, x, A, p, seed)
    assert torch.isnan(dA[:, j_drop]).all() and torch.isnan(dA[:, j_keep]).all()


def test_keep_mask_is_the_same_on_several_threads(monkeypatch):
    """The mask is generated chunk-parallel when torch may use several threads; the
    chunks must tile the matrix exactly, whatever the thread count."""
    monkeypatch.setattr(reference, "_CHUNK", 5 * 13)  # many chunks, ragged last one
    one = reference.dropout_keep_mask(99, 77, 50, 0.2)
    n = torch.get_num_threads()
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(reference.dropout_keep_mask(99, 77, 50, 0.2), one)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, _keep_mask_by_definition(99, 77, 50, 0.2))
