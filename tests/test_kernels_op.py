"""The whole op on the Triton backend (fwd + every gradient) against the fp64 oracle,
and the dropout mask the kernels really use, read back exactly."""

from __future__ import annotations

import pytest
import torch

import lorakern
from lorakern import reference
from tests.conftest import HAS_CUDA, KERNEL_DEVICE, requires_cuda, requires_triton
from tests.kernel_cases import DTYPE_IDS, DTYPES, check_against_oracle, condition_number, randn

pytestmark = requires_triton
params = pytest.mark.parametrize
SEED = 77


def _grads(x, W, bias, A, B, s, p, seed, backend, dy, want_w=False):
    """Run lora_linear on fresh leaf copies; return (y, {name: grad})."""
    leaves = {"x": x, "A": A, "B": B}
    if bias is not None:
        leaves["bias"] = bias
    if want_w:
        leaves["W"] = W
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    W_in = leaves.get("W", W)
    y = lorakern.lora_linear(
        leaves["x"], W_in, leaves.get("bias"), leaves["A"], leaves["B"], s,
        dropout_p=p, seed=seed, backend=backend,
    )
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def run_op_case(x, W, bias, A, B, s, p, dy, dtype, want_w=False):
    """Triton vs reference-in-dtype vs fp64 reference: output and every gradient."""
    y, g = _grads(x, W, bias, A, B, s, p, SEED, "triton", dy, want_w)
    y_ref, g_ref = _grads(x, W, bias, A, B, s, p, SEED, "reference", dy, want_w)
    to64 = (lambda t: None if t is None else t.double())
    y_64, g_64 = _grads(to64(x), to64(W), to64(bias), to64(A), to64(B), s, p, SEED, "reference", to64(dy), want_w)
    # The same oracle on |inputs| sums |terms|: each result's condition number.
    abs64 = (lambda t: None if t is None else t.double().abs())
    y_abs, g_abs = _grads(abs64(x), abs64(W), abs64(bias), abs64(A), abs64(B), abs(s), p, SEED, "reference", abs64(dy), want_w)
    assert y.dtype == x.dtype
    errors = {"y": check_against_oracle(y, y_ref, y_64, dtype, "y", condition_number(y_abs, y_64))}
    for name, grad in g.items():
        source = {"x": x, "A": A, "B": B, "bias": bias, "W": W}[name]
        assert grad is not None, f"no gradient reached {name}"
        assert grad.dtype == source.dtype, f"d{name} dtype {grad.dtype} != {name} dtype {source.dtype}"
        cond = condition_number(g_abs[name], g_64[name])
        errors[name] = check_against_oracle(grad, g_ref[name], g_64[name], dtype, f"d{name}", cond)
    return errors


@params("dtype", DTYPES, ids=DTYPE_IDS.get)
@params("M", [0, 1, 7, 130], ids=lambda m: f"M{m}")
@params("r", [1, 7, 16, 64], ids=lambda r: f"r{r}")
@params("has_bias", [True, False], ids=["bias", "nobias"])
@params("p", [0.0, 0.1], ids=lambda p: f"p{p}")
def test_op_matches_reference(dtype, M, r, has_bias, p):
    K, N = 37, 29
    dev = KERNEL_DEVICE
    x = randn(M, K, dtype=dtype, device=dev)
    W = randn(N, K, dtype=dtype, device=dev)
    bias = randn(N, dtype=dtype, device=dev) if has_bias else None
    # Adapters in fp32 (PEFT's default) for half-precision x, else x's dtype.
    A = randn(r, K, dtype=torch.float32, device=dev, scale=0.3)
    B = randn(N, r, dtype=torch.float32, device=dev, scale=0.3)
    dy = randn(M, N, dtype=dtype, device=dev)
    run_op_case(x, W, bias, A, B, 1.5, p, dy, dtype)


@params("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_op_adapters_in_input_dtype_and_weight_grad(dtype):
    K, N, M, r = 45, 31, 19, 8
    dev = KERNEL_DEVICE
    x, W = randn(M, K, dtype=dtype, device=dev), randn(N, K, dtype=dtype, device=dev)
    bias = randn(N, dtype=dtype, device=dev)
    A, B = randn(r, K, dtype=dtype, device=dev), randn(N, r, dtype=dtype, device=dev)
    dy = randn(M, N, dtype=dtype, device=dev)
    run_op_case(x, W, bias, A, B, 0.25, 0.1, dy, dtype, want_w=True)


@params("layout", ["3d", "3d-noncontiguous", "transposed-2d"])
@params("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_op_leading_dims_and_strides(layout, dtype):
    K, N, r = 33, 21, 5
    dev = KERNEL_DEVICE
    if layout == "3d":
        x = randn(3, 11, K, dtype=dtype, device=dev)
    elif layout == "3d-noncontiguous":
        x = randn(11, 3, K, dtype=dtype, device=dev).transpose(0, 1)
    else:
        x = randn(K, 17, dtype=dtype, device=dev).t()
    assert layout == "3d" or not x.is_contiguous()
    W = randn(N, K, dtype=dtype, device=dev)
    bias = randn(N, dtype=dtype, device=dev)
    A, B = randn(r, K, dtype=torch.float32, device=dev), randn(N, r, dtype=torch.float32, device=dev)
    dy = randn(*x.shape[:-1], N, dtype=dtype, device=dev)
    run_op_case(x, W, bias, A, B, 2.0, 0.1, dy, dtype)


@params("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@params("fused", ["1", "0", "merged"], ids=["fused-gemm", "cublas-gemm", "merged-weight"])
def test_op_every_gemm_variant(fused, p, switches, monkeypatch):
    """LORAKERN_FUSED_GEMM forces each variant of the large-M forward and of dx (the merged
    weight only where dropout is off; with dropout it falls back to cuBLAS + pass); each
    is within DESIGN §5 of the fp64 oracle on the output and every gradient."""
    from lorakern.kernels import dispatch

    switches(LORAKERN_FUSED_GEMM=fused)
    ran = []
    for name in ("lora_forward_merged", "lora_backward_dx_merged", "lora_forward_fused", "lora_forward_unfused"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, real=real, name=name, **k: ran.append(name) or real(*a, **k))
    dev, dtype = KERNEL_DEVICE, torch.float16
    K, N, M, r = 40, 27, 65, 16  # M > ONEPASS_MAX_M: the large-M path
    x, W = randn(M, K, dtype=dtype, device=dev), randn(N, K, dtype=dtype, device=dev)
    bias = randn(N, dtype=dtype, device=dev)
    A, B = randn(r, K, dtype=torch.float32, device=dev), randn(N, r, dtype=torch.float32, device=dev)
    run_op_case(x, W, bias, A, B, 0.5, p, randn(M, N, dtype=dtype, device=dev), dtype)
    merged = fused == "merged" and p == 0.0
    assert ("lora_forward_merged" in ran) == merged and ("lora_backward_dx_merged" in ran) == merged
    assert ("lora_forward_fused" in ran) == (fused == "1")


@params("N", [40, 27], ids=["N40", "N27"])
def test_op_forced_tma_forward(N, switches, monkeypatch):
    """LORAKERN_FUSED_GEMM=tma runs the persistent TMA forward where its layout fits (N·2
    bytes a multiple of 16) and cuBLAS + pass where not; output and every gradient within
    DESIGN §5 of the fp64 oracle."""
    from lorakern.kernels import dispatch

    switches(LORAKERN_FUSED_GEMM="tma")
    ran = []
    real = dispatch.lora_forward_tma
    monkeypatch.setattr(dispatch, "lora_forward_tma", lambda *a: ran.append(1) or real(*a))
    dev, dtype = KERNEL_DEVICE, torch.bfloat16
    K, M, r = 40, 65, 16
    x, W = randn(M, K, dtype=dtype, device=dev), randn(N, K, dtype=dtype, device=dev)
    A, B = randn(r, K, dtype=torch.float32, device=dev), randn(N, r, dtype=torch.float32, device=dev)
    run_op_case(x, W, randn(N, dtype=dtype, device=dev), A, B, 0.5, 0.1, randn(M, N, dtype=dtype, device=dev), dtype)
    assert bool(ran) == (N == 40)


@params("fused", ["1", "0", "merged"], ids=["fused-gemm", "cublas-gemm", "merged-weight"])
def test_inference_merged_weight_skips_the_shrink(fused, switches, monkeypatch):
    """No autograd, dropout 0, large M: S is not needed, so the merged-weight variant runs
    without the shrink kernel (the others still need S for y); y within DESIGN §5 of
    the fp64 oracle either way."""
    from lorakern import op_core
    from lorakern.kernels import dispatch

    switches(LORAKERN_FUSED_GEMM=fused)
    shrinks = []
    real = dispatch.lora_shrink
    monkeypatch.setattr(dispatch, "lora_shrink", lambda *a: shrinks.append(1) or real(*a))
    dev, dtype = KERNEL_DEVICE, torch.bfloat16
    K, N, M, r = 40, 27, 65, 16
    x, W, bias = randn(M, K, dtype=dtype, device=dev), randn(N, K, dtype=dtype, device=dev), randn(N, dtype=dtype, device=dev)
    A, B = randn(r, K, dtype=torch.float32, device=dev), randn(N, r, dtype=torch.float32, device=dev)
    with torch.no_grad():
        y = lorakern.lora_linear(x, W, bias, A, B, 0.5, backend="triton")
    assert bool(shrinks) == (fused != "merged")
    y_ref = op_core.forward_core(x, W, bias, A, B, 0.5, 0.0, 0, "reference")[0]
    y_64 = op_core.forward_core(x.double(), W.double(), bias.double(), A.double(), B.double(), 0.5, 0.0, 0, "reference")[0]
    check_against_oracle(y, y_ref, y_64, dtype, "y")


# ------------------------------------------------------------------ dropout


def kernel_forward_mask(seed: int, M: int, K: int, p: float) -> torch.Tensor:
    """Read back the mask the shrink kernel applies: x = 1, A = I gives S = keep / (1-p)."""
    from lorakern import kernels

    x = torch.ones(M, K, device=KERNEL_DEVICE)
    S = kernels.lora_shrink(x, torch.eye(K, device=KERNEL_DEVICE), p, seed)
    keep = S != 0
    assert torch.equal(S[keep], torch.full_like(S[keep], 1.0 / (1.0 - p))), "kept elements not scaled by 1/(1-p)"
    return keep


def kernel_backward_masks(seed: int, M: int, K: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks the dx kernel (W = 0, dS = 1, A = I) and the dA kernel apply."""
    from lorakern import kernels

    dev = KERNEL_DEVICE
    eye = torch.eye(K, device=dev)
    dx = kernels.lora_backward_dx(torch.zeros(M, 3, device=dev), torch.zeros(3, K, device=dev), torch.ones(M, K, device=dev), eye, p, seed)
    # dA[r, k] = Σ_m dS[m, r] D(x)[m, k]: with dS one-hot in row i, row r=0 reads mask row i.
    rows = []
    for i in range(M):
        dS = torch.zeros(M, 1, device=dev)
        dS[i, 0] = 1.0
        rows.append(kernels.lora_backward_da(dS, torch.ones(M, K, device=dev), torch.zeros(1, K, device=dev), p, seed)[0])
    return dx != 0, torch.stack(rows) != 0


def test_kernel_mask_is_the_reference_mask_in_forward_and_backward():
    M, K, p, seed = 9, 64, 0.3, 2024
    keep_fwd = kernel_forward_mask(seed, M, K, p).cpu()
    keep_dx, keep_da = kernel_backward_masks(seed, M, K, p)
    expected = reference.dropout_keep_mask(seed, M, K, p)
    assert torch.equal(keep_fwd, expected)
    assert torch.equal(keep_dx.cpu(), expected), "dx kernel regenerates a different mask"
    assert torch.equal(keep_da.cpu(), expected), "dA kernel regenerates a different mask"


@params("p", [0.1, 0.5])
def test_kernel_keep_rate_within_binomial_band(p):
    M, K = 600, 64
    keep = kernel_forward_mask(11, M, K, p)
    n = M * K
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(int(keep.sum()) - n * (1 - p)) < 5 * sigma


def test_kernel_different_seeds_give_different_masks():
    a = kernel_forward_mask(1, 16, 64, 0.5)
    b = kernel_forward_mask(2, 16, 64, 0.5)
    assert not torch.equal(a, b)
    # and the mask is not the same for every row (element index enters the hash)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 16))


def test_triton_op_is_bit_reproducible_for_a_seed():
    dev, dt = KERNEL_DEVICE, torch.bfloat16
    K, N, M, r = 48, 24, 33, 8
    x, W = randn(M, K, dtype=dt, device=dev), randn(N, K, dtype=dt, device=dev)
    A, B = randn(r, K, dtype=torch.float32, device=dev), randn(N, r, dtype=torch.float32, device=dev)
    dy = randn(M, N, dtype=dt, device=dev)
    y1, g1 = _grads(x, W, None, A, B, 1.0, 0.2, 5, "triton", dy)
    y2, g2 = _grads(x, W, None, A, B, 1.0, 0.2, 5, "triton", dy)
    y3, _ = _grads(x, W, None, A, B, 1.0, 0.2, 6, "triton", dy)
    assert torch.equal(y1, y2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert not torch.equal(y1, y3)


def test_seed_none_follows_torch_manual_seed_on_triton():
    dev = KERNEL_DEVICE
    x, W = randn(8, 32, dtype=torch.float32, device=dev), randn(16, 32, dtype=torch.float32, device=dev)
    A, B = randn(4, 32, dtype=torch.float32, device=dev), randn(16, 4, dtype=torch.float32, device=dev)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(lorakern.lora_linear(x, W, None, A, B, 1.0, dropout_p=0.5, backend="triton"))
    torch.manual_seed(124)
    other = lorakern.lora_linear(x, W, None, A, B, 1.0, dropout_p=0.5, backend="triton")
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], other)


def test_triton_backward_saves_no_mask_and_no_extra_activation():
    dev = KERNEL_DEVICE
    M, K, N, r = 40, 24, 16, 4
    x = randn(M, K, dtype=torch.float32, device=dev).requires_grad_(True)
    W = randn(N, K, dtype=torch.float32, device=dev)
    A = randn(r, K, dtype=torch.float32, device=dev).requires_grad_(True)
    B = randn(N, r, dtype=torch.float32, device=dev).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lorakern.lora_linear(x, W, None, A, B, 1.0, dropout_p=0.3, backend="triton")
    big = [t for t in saved if t.numel() >= M * K]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]
    assert not any(t.dtype == torch.bool for t in saved)
    y.sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None


# ------------------------------------------------------------------ CUDA, larger shapes


@requires_cuda
@params("dtype", DTYPES, ids=DTYPE_IDS.get)
@params("shape", [(1, 4096, 4096, 16), (257, 1000, 1030, 7), (2048, 4096, 1024, 64)], ids=lambda s: "x".join(map(str, s)))
@params("fused", ["1", "0", "merged"], ids=["fused-gemm", "cublas-gemm", "merged-weight"])
def test_op_cuda_large(dtype, shape, fused, switches):
    switches(LORAKERN_FUSED_GEMM=fused)
    M, K, N, r = shape
    dev = "cuda"
    x, W = randn(M, K, dtype=dtype, device=dev), randn(N, K, dtype=dtype, device=dev, scale=K**-0.5)
    bias = randn(N, dtype=dtype, device=dev)
    A, B = randn(r, K, dtype=torch.float32, device=dev, scale=K**-0.5), randn(N, r, dtype=torch.float32, device=dev)
    p = 0.0 if fused == "merged" else 0.1  # the merged weight exists only without dropout
    run_op_case(x, W, bias, A, B, 2.0, p, randn(M, N, dtype=dtype, device=dev), dtype)


@requires_cuda
def test_cuda_mask_matches_reference():
    assert HAS_CUDA
    M, K, p, seed = 300, 64, 0.25, 99
    assert torch.equal(kernel_forward_mask(seed, M, K, p).cpu(), reference.dropout_keep_mask(seed, M, K, p))
