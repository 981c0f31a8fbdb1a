"""The mixed-batch (SGMV) kernels and the fused mixed op (lorakern/kernels/sgmv.py, lorakern/mixed_ops.py).

Kernels against their reference functions and an fp64 oracle (in Triton's interpreter
on CPU, on the GPU when there is one); the fused op against the per-adapter loop
(`lora_linear_looped`) on every gradient; the layer's stack cache against changes.
"""

from __future__ import annotations

import pytest
import torch

import lorakern
from lorakern import reference
from lorakern.mixed import lora_linear_looped
from tests.conftest import KERNEL_DEVICE, requires_cuda, requires_triton
from tests.kernel_cases import DTYPE_IDS, DTYPES, check_against_oracle, randn

pytest.importorskip("triton")
pytestmark = requires_triton

K, N = 45, 37
SEED = 4321
RANKS = [1, 7, 16]  # adapter ranks, stacked and zero-padded to 16
DTYPE_PAIRS = [(dt, dt) for dt in DTYPES] + [(torch.bfloat16, torch.float32)]
params = pytest.mark.parametrize
dtype_pairs = params(
    "dtypes", DTYPE_PAIRS, ids=lambda d: DTYPE_IDS[d[0]] if d[0] == d[1] else f"{DTYPE_IDS[d[0]]}-A{DTYPE_IDS[d[1]]}"
)


def _sgmv():
    from lorakern.kernels import sgmv

    return sgmv


def _rows(M: int, n: int, seed: int = 0) -> torch.Tensor:
    """A random adapter per row in [-1, n), every value present when M allows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, n, (M,), generator=g)


def _stacks(adt, ranks=RANKS, k=K, n_out=N, device=KERNEL_DEVICE):
    """Zero-padded stacks A [n, R, K], B [n, N, R] of adapters with `ranks`."""
    As = [randn(r, k, dtype=adt, device=device) for r in ranks]
    Bs = [randn(n_out, r, dtype=adt, device=device) for r in ranks]
    return lorakern.mixed_ops.stack_adapters(As, Bs)


def _vectors(p_on: bool, n: int, device=KERNEL_DEVICE):
    scalings = [0.5, 2.0, 0.125, 1.0][:n]
    ps = [0.1, 0.0, 0.3, 0.2][:n] if p_on else [0.0] * n
    return lorakern.mixed_ops.scalar_vectors(scalings, ps, device)


def _seg(row_adapter, n):
    return reference.segments(row_adapter.to(KERNEL_DEVICE), n)


# ---- segments -------------------------------------------------------------------------


def test_segments_group_rows_by_adapter_without_the_base_rows():
    ra = torch.tensor([2, -1, 0, 2, 2, -1, 0])
    order, starts, counts = reference.segments(ra, 4)
    assert counts.tolist() == [2, 0, 3, 0]
    for a in range(4):
        rows = order[starts[a] : starts[a] + counts[a]].tolist()
        assert rows == [m for m, r in enumerate(ra.tolist()) if r == a]  # in row order (stable)
    assert sorted(order.tolist()) == list(range(7))


# ---- kernels against reference and fp64 oracle ---------------------------------------------


@dtype_pairs
@params("M", [0, 1, 37], ids=lambda m: f"M{m}")
@params("p_on", [False, True], ids=["p0", "p"])
def test_shrink(dtypes, M, p_on):
    dt, adt = dtypes
    A, _ = _stacks(adt)
    scale, inv_keep, p = _vectors(p_on, len(RANKS))
    x = randn(M, K, dtype=dt, device=KERNEL_DEVICE)
    seg = _seg(_rows(M, len(RANKS)), len(RANKS))
    out = _sgmv().sgmv_shrink(x, A, seg, inv_keep, p, SEED)
    assert out.dtype == torch.float32 and out.shape == (M, A.shape[1])
    ref = reference.sgmv_shrink(x, A, seg, inv_keep, p, SEED)
    oracle = reference.sgmv_shrink(x.double(), A.double(), seg, inv_keep.double(), p, SEED)
    check_against_oracle(out, ref, oracle, dt, "S")
    # rows without an adapter stay exactly zero
    base = (seg[0].new_tensor(_rows(M, len(RANKS)).tolist()) == -1).cpu()
    assert torch.equal(out.cpu()[base], torch.zeros_like(out.cpu()[base]))


@dtype_pairs
@params("M", [1, 37])
@params("p_on", [False, True], ids=["p0", "p"])
@params("side", ["y", "dx"])
def test_expand(dtypes, M, p_on, side):
    dt, adt = dtypes
    A, B = _stacks(adt)
    scale, inv_keep, p = _vectors(p_on, len(RANKS))
    # forward: out [M, N] += s·S Bᵀ; dx: out [M, K] += D(dS A) (A viewed as [n, K, R])
    W, vec, drop = (B, scale, None) if side == "y" else (A.transpose(1, 2), inv_keep, p)
    S = randn(M, W.shape[2], dtype=torch.float32, device=KERNEL_DEVICE)
    out0 = randn(M, W.shape[1], dtype=dt, device=KERNEL_DEVICE)
    seg = _seg(_rows(M, len(RANKS), seed=1), len(RANKS))
    out = _sgmv().sgmv_expand(out0.clone(), S, W, seg, vec, drop, SEED)
    ref = reference.sgmv_expand(out0.clone(), S, W, seg, vec, drop, SEED)
    oracle = reference.sgmv_expand(out0.double(), S.double(), W.double(), seg, vec.double(), drop, SEED)
    check_against_oracle(out, ref, oracle, dt, side)


@dtype_pairs
@params("M", [0, 1, 37, 70], ids=lambda m: f"M{m}")
@params("grad", ["dB", "dA", "dA-p"])
def test_grad(dtypes, M, grad):
    dt, adt = dtypes
    n, R = len(RANKS), 16
    scale, inv_keep, p = _vectors(grad == "dA-p", n)
    seg = _seg(_rows(M, n, seed=2), n)
    if grad == "dB":  # dB = s·dYᵀ S
        left, right, vec, side = randn(M, N, dtype=dt, device=KERNEL_DEVICE), randn(M, R, dtype=torch.float32, device=KERNEL_DEVICE), scale, "right"
    else:  # dA = dSᵀ D(x)
        left, right, vec, side = randn(M, R, dtype=torch.float32, device=KERNEL_DEVICE), randn(M, K, dtype=dt, device=KERNEL_DEVICE), inv_keep, "left"
    out = _sgmv().sgmv_grad(left, right, seg, vec, p, SEED, rank_side=side)
    assert out.dtype == torch.float32 and out.shape == (n, left.shape[1], right.shape[1])
    counts = seg[2].tolist()
    for a in range(n):
        if counts[a] == 0:
            assert torch.equal(out[a].cpu(), torch.zeros_like(out[a].cpu())), f"adapter {a} has no rows"
    if M == 0:
        return
    ref = reference.sgmv_grad(left, right, seg, vec, p, SEED, rank_side=side)
    oracle = reference.sgmv_grad(left.double(), right.double(), seg, vec.double(), p, SEED, rank_side=side)
    check_against_oracle(out, ref, oracle, dt, grad)


def test_kernel_mask_is_the_single_adapter_mask_of_the_whole_input():
    """Row m of adapter a is masked as row m of the single-adapter mask of all of x."""
    M, n = 29, 3
    x = torch.ones(M, K, device=KERNEL_DEVICE)
    A = torch.eye(K, device=KERNEL_DEVICE)[:16].expand(n, 16, K).contiguous()  # S = the first 16 columns of D(x)
    ps = [0.25, 0.0, 0.5]
    scale, inv_keep, p = lorakern.mixed_ops.scalar_vectors([1.0] * n, ps, KERNEL_DEVICE)
    ra = _rows(M, n, seed=3)
    S = _sgmv().sgmv_shrink(x, A, _seg(ra, n), torch.ones(n, device=KERNEL_DEVICE), p, SEED).cpu()
    for a, q in enumerate(ps):
        keep = reference.dropout_keep_mask(SEED, M, K, q)[:, :16] if q > 0 else torch.ones(M, 16, dtype=torch.bool)
        sel = ra == a
        assert sel.any()
        assert torch.equal(S[sel] != 0, keep[sel]), f"adapter {a} (p={q})"


def test_launchers_reject_mismatched_shapes():
    A, B = _stacks(torch.float32)
    seg = _seg(_rows(5, 3), 3)
    scale = torch.ones(3, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="disagree on K"):
        _sgmv().sgmv_shrink(torch.randn(5, K + 1, device=KERNEL_DEVICE), A, seg, scale)
    with pytest.raises(ValueError, match="disagree"):
        _sgmv().sgmv_expand(torch.randn(5, N + 1, device=KERNEL_DEVICE), torch.randn(5, 16, device=KERNEL_DEVICE), B, seg, scale)


# ---- the fused op against the per-adapter loop ---------------------------------------------------


def _positive(*shape, dtype, device, scale=1.0):
    # positive inputs and upstream gradient: no cancellation, so every result has
    # condition number 1 and the fp32 bound (RTOL) is fair to both implementations
    return (torch.rand(*shape) * scale + 0.1).to(device=device, dtype=dtype)


def _leaves(dt, adt, ranks, device=KERNEL_DEVICE, shape=(7, 3)):
    x = _positive(*shape, K, dtype=dt, device=device).requires_grad_()
    W = _positive(N, K, dtype=dt, device=device).requires_grad_()
    bias = _positive(N, dtype=dt, device=device).requires_grad_()
    As = [_positive(r, K, dtype=adt, device=device, scale=0.3).requires_grad_() for r in ranks]
    Bs = [_positive(N, r, dtype=adt, device=device, scale=0.3).requires_grad_() for r in ranks]
    return x, W, bias, As, Bs


def _run(fn, leaves, row_adapter, scalings, **kw):
    x, W, bias, As, Bs = leaves
    for t in (x, W, bias, *As, *Bs):
        t.grad = None
    y = fn(x, W, bias, As, Bs, scalings, row_adapter, **kw)
    g = torch.Generator().manual_seed(9)
    y.backward(torch.rand(y.shape, generator=g).to(y.device, y.dtype))
    return y.detach(), [None if t.grad is None else t.grad.clone() for t in (x, W, bias, *As, *Bs)]


@dtype_pairs
@params("shape", [(7, 3), (5,)], ids=["3d", "2d"])
def test_fused_op_matches_the_loop_on_output_and_every_gradient(dtypes, shape):
    dt, adt = dtypes
    ranks = [1, 7, 16, 4]  # the last one used by no row: no gradient
    leaves = _leaves(dt, adt, ranks, shape=shape)
    ra = [2, -1, 0, 2, 1, 0, -1][: shape[0]]
    scalings = [0.5, 2.0, 0.25, 3.0]
    y_loop, g_loop = _run(lora_linear_looped, leaves, ra, scalings, backend="reference")
    y, g = _run(lorakern.lora_linear_mixed, leaves, ra, scalings, backend="triton")
    x, W, bias, As, Bs = leaves
    names = ["dx", "dW", "dbias"] + [f"dA{i}" for i in range(4)] + [f"dB{i}" for i in range(4)]
    assert g[names.index("dA3")] is None and g[names.index("dB3")] is None  # unused adapter
    # fp64 oracle: the loop in float64
    leaves64 = [t.detach().double().requires_grad_() for t in (x, W, bias)]
    As64 = [a.detach().double().requires_grad_() for a in As]
    Bs64 = [b.detach().double().requires_grad_() for b in Bs]
    y64, g64 = _run(lora_linear_looped, (*leaves64, As64, Bs64), ra, scalings, backend="reference")
    check_against_oracle(y, y_loop, y64, dt, "y")
    for name, a, b, c in zip(names, g, g_loop, g64):
        if c is None:
            assert a is None and b is None, name
            continue
        assert a.dtype == b.dtype, name
        check_against_oracle(a, b, c, dt, name)


def test_fused_op_dropout_grads_match_the_reference_implementation_bit_for_bit():
    """MixedLoraFunction with the Triton kernels and with the reference functions: same
    mask from the same seed, in fp32 the same numbers on every gradient."""
    from lorakern.mixed_ops import MixedLoraFunction

    M, n = 23, 3
    A, B = (t.requires_grad_() for t in _stacks(torch.float32))
    x = randn(M, K, dtype=torch.float32, device=KERNEL_DEVICE).requires_grad_()
    W = randn(N, K, dtype=torch.float32, device=KERNEL_DEVICE).requires_grad_()
    vec = _vectors(True, n)
    ra = _rows(M, n, seed=5).to(KERNEL_DEVICE)
    dy = randn(M, N, dtype=torch.float32, device=KERNEL_DEVICE)
    outs = []
    for backend in ("triton", "reference"):
        for t in (x, W, A, B):
            t.grad = None
        y = MixedLoraFunction.apply(x, W, None, A, B, *vec, reference.segments(ra, n), SEED, backend)
        y.backward(dy)
        outs.append([y.detach(), x.grad.clone(), W.grad.clone(), A.grad.clone(), B.grad.clone()])
    for name, a, b in zip(["y", "dx", "dW", "dA", "dB"], *outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # and the mask really drops: the same call without dropout differs
    y0 = MixedLoraFunction.apply(x, W, None, A, B, vec[0], torch.ones_like(vec[1]), None, reference.segments(ra, n), SEED, "triton")
    assert not torch.allclose(y0, outs[0][0])


def test_fused_op_refuses_second_order_gradients():
    leaves = _leaves(torch.float32, torch.float32, [2, 3])
    x, W, bias, As, Bs = leaves
    y = lorakern.lora_linear_mixed(x, W, bias, As, Bs, [1.0, 1.0], [0, 1, 1, 0, -1, 0, 1], backend="triton")
    with pytest.raises(RuntimeError, match="higher-order"):
        torch.autograd.grad(y.sum(), As[0], create_graph=True)


def test_fused_op_checks_inputs_like_the_single_adapter_op():
    x, W, bias, As, Bs = _leaves(torch.float32, torch.float32, [2, 3])
    with pytest.raises(ValueError, match="lora_B"):
        lorakern.lora_linear_mixed(x, W, bias, As, [Bs[0], Bs[0]], [1.0, 1.0], [0, 1, 1, 0, -1, 0, 1], backend="triton")
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        lorakern.lora_linear_mixed(x, W, bias, As, Bs, [1.0, 1.0], [0, 2, 1, 0, -1, 0, 1], backend="triton")


# ---- the layer path: stacks kept between calls ---------------------------------------------


def _two_adapter_model(backend):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.ReLU(), torch.nn.Linear(N, 16)).to(KERNEL_DEVICE)
    m = lorakern.inject(m, lorakern.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False), backend=backend)
    lorakern.inject(m, lorakern.LoraConfig(r=8, lora_alpha=3, target_modules=["0", "2"], init_lora_weights=False),
                    adapter_name="b", backend=backend)
    return m


NAMES = ["b", "__base__", "default", "b", "default"]


def _ref_forward(m, x, names):
    """Each row alone through its adapter (the oracle of a mixed batch)."""
    out = []
    for i, name in enumerate(names):
        if name == "__base__":
            with lorakern.disable_adapters(m):
                out.append(m(x[i : i + 1]))
        else:
            lorakern.set_adapter(m, name)
            out.append(m(x[i : i + 1]))
    return torch.cat(out)


def test_layer_path_serves_from_cached_stacks_and_rebuilds_them_on_change():
    m = _two_adapter_model("triton").eval()
    layer = m[0]
    x = torch.randn(5, 3, K, device=KERNEL_DEVICE)
    with torch.no_grad():
        with lorakern.mixed_batch(m, NAMES):
            y = m(x)
        stacks = layer.__dict__["_sgmv_stacks"][1]
        with lorakern.mixed_batch(m, NAMES):
            y2 = m(x)
        assert layer.__dict__["_sgmv_stacks"][1] is stacks  # reused, not rebuilt
        assert torch.equal(y, y2)
        torch.testing.assert_close(y, _ref_forward(m, x, NAMES), rtol=1e-5, atol=1e-5)
        # an in-place update of one adapter (an optimiser step, a hot-swap by copy_)
        layer.lora_B["b"].weight.mul_(2)
        with lorakern.mixed_batch(m, NAMES):
            y3 = m(x)
        assert layer.__dict__["_sgmv_stacks"][1] is not stacks
        torch.testing.assert_close(y3, _ref_forward(m, x, NAMES), rtol=1e-5, atol=1e-5)
        # a replaced parameter, a new scaling, a deleted adapter
        layer.lora_A["default"].weight = torch.nn.Parameter(torch.randn_like(layer.lora_A["default"].weight))
        layer.scaling["b"] = 0.125
        with lorakern.mixed_batch(m, NAMES):
            y4 = m(x)
        torch.testing.assert_close(y4, _ref_forward(m, x, NAMES), rtol=1e-5, atol=1e-5)
        lorakern.delete_adapter(m, "b")
        names = ["default", "__base__", "default", "__base__", "__base__"]
        with lorakern.mixed_batch(m, names):
            y5 = m(x)
        torch.testing.assert_close(y5, _ref_forward(m, x, names), rtol=1e-5, atol=1e-5)


def test_layer_path_training_matches_the_reference_backend_and_caches_nothing():
    m = _two_adapter_model("triton").train()
    ref = _two_adapter_model("reference").train()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 3, K, device=KERNEL_DEVICE)
    grads = []
    for model in (m, ref):
        lorakern.set_adapter(model, ["default", "b"])  # both trainable
        with lorakern.mixed_batch(model, NAMES):
            y = model(x)
        y.square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert "_sgmv_stacks" not in m[0].__dict__
    assert sorted(grads[0]) == sorted(grads[1]) and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k].cpu(), grads[1][k].cpu(), rtol=1e-5, atol=1e-5, msg=k)


# ---- CUDA: Llama-sized shapes, many adapters ---------------------------------------------


@requires_cuda
@params("M", [16, 256, 2048])
def test_cuda_many_adapters_at_llama_shapes(M):
    n, r, k, n_out = 64, 16, 4096, 4096
    dt = torch.bfloat16
    x = randn(M, k, dtype=dt, device="cuda")
    W = randn(n_out, k, dtype=dt, device="cuda", scale=k ** -0.5)
    As = [randn(r, k, dtype=dt, device="cuda", scale=k ** -0.5) for _ in range(n)]
    Bs = [randn(n_out, r, dtype=dt, device="cuda", scale=r ** -0.5) for _ in range(n)]
    ra = _rows(M, n, seed=7).tolist()
    y = lorakern.lora_linear_mixed(x, W, None, As, Bs, [2.0] * n, ra, backend="triton")
    y64 = lora_linear_looped(x.double().cpu(), W.double().cpu(), None, [a.double().cpu() for a in As],
                             [b.double().cpu() for b in Bs], [2.0] * n, ra, backend="reference")
    y_loop = lora_linear_looped(x, W, None, As, Bs, [2.0] * n, ra, backend="triton")
    check_against_oracle(y, y_loop, y64, dt, "y")



def test_layer_stacks_follow_train_eval_and_dropout_changes():
    torch.manual_seed(3)
    layer = lorakern.LoraLinear(torch.nn.Linear(K, N), r=4, adapter_name="a", init_lora_weights=False,
                                lora_dropout=0.0, backend="triton").to(KERNEL_DEVICE)
    layer.update_layer("b", 2, 4, init_lora_weights=False)
    x = torch.randn(4, K, device=KERNEL_DEVICE)
    names = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        y_eval = layer.eval()(x, adapter_names=names)
        layer.lora_dropout["a"] = 0.5
        assert torch.equal(layer(x, adapter_names=names), y_eval)  # eval: no dropout at all
        y_train = layer.train()(x, adapter_names=names)  # dropout on "a" rows now
        assert not torch.allclose(y_train[0], y_eval[0]) and torch.allclose(y_train[1], y_eval[1])
        layer.lora_dropout["a"] = 0.0
        torch.testing.assert_close(layer(x, adapter_names=names), y_eval)
