"""The autograd op `lora_linear`: what it saves, empty inputs, NaN/Inf, which grads flow, dispatch.

CPU, backend="reference" unless a test is about dispatch itself.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import lorakern
from lorakern import lora_linear, op_core, ops, reference
from tests.conftest import backend_device
from tests.utils import RTOL, assert_close


def make_inputs(lead, k, n, r, dtype=torch.float32, adapter_dtype=None):
    adapter_dtype = dtype if adapter_dtype is None else adapter_dtype
    x = torch.randn(*lead, k, dtype=dtype)
    weight = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
    bias = torch.randn(n, dtype=dtype)
    lora_A = (torch.randn(r, k) / math.sqrt(k)).to(adapter_dtype)
    lora_B = torch.randn(n, r, dtype=adapter_dtype)
    return x, weight, bias, lora_A, lora_B


def naive(x, weight, bias, lora_A, lora_B, scaling, p=0.0, seed=0):
    """fp64 x Wᵀ + bias + s·(dropout(x) Aᵀ) Bᵀ with the seeded keep mask."""
    x, weight, lora_A, lora_B = (t.double() for t in (x, weight, lora_A, lora_B))
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xd = x2
    if p > 0.0:
        xd = x2 * reference.dropout_keep_mask(seed, x2.shape[0], k, p).double() / (1.0 - p)
    y = x2 @ weight.t() + scaling * (xd @ lora_A.t()) @ lora_B.t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- saved tensors


class SavedRecorder:
    """saved_tensors_hooks that record (shape, dtype, data_ptr) of everything autograd saves."""

    def __init__(self):
        self.saved: list[tuple[tuple[int, ...], torch.dtype, int, int]] = []

    def pack(self, t):
        self.saved.append((tuple(t.shape), t.dtype, t.untyped_storage().data_ptr(), t.numel()))
        return t

    @staticmethod
    def unpack(t):
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


# M*K is larger than N*K, so any saved tensor with >= M*K elements other than x is a
# mask or a dropped copy of x.
M_S, K_S, N_S, R_S = 64, 48, 40, 4


def _check_saved(rec: SavedRecorder, x: torch.Tensor) -> None:
    x_ptr = x.untyped_storage().data_ptr()
    big = [s for s in rec.saved if s[3] >= M_S * K_S]
    assert big, "x itself was not saved (expected it among the saved tensors)"
    for shape, dtype, ptr, _ in big:
        assert ptr == x_ptr, f"a saved tensor {shape} {dtype} of >= M*K elements is not x"
    masks = [s for s in rec.saved if s[1] in (torch.bool, torch.uint8)]
    assert not masks, f"a bool/uint8 tensor was saved: {masks}"


@pytest.mark.parametrize("lead", [(M_S,), (4, M_S // 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_saves_nothing_of_size_mk_but_x(lead, p):
    x, w, b, A, B = make_inputs(lead, K_S, N_S, R_S)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    rec = SavedRecorder()
    with rec.hooks():
        y = lora_linear(x, w, b, A, B, 0.5, dropout_p=p, seed=3, backend="reference")
    # The backward still works from what was saved (and gives the naive formula's grads).
    dy = torch.randn_like(y)
    dx, dA = torch.autograd.grad(y, (x, A), dy)
    x64, A64 = x.detach().double().requires_grad_(), A.detach().double().requires_grad_()
    dx_ref, dA_ref = torch.autograd.grad(naive(x64, w, b, A64, B.detach(), 0.5, p, 3), (x64, A64), dy.double())
    assert_close(dx, dx_ref, RTOL[torch.float32], "dx")
    assert_close(dA, dA_ref, RTOL[torch.float32], "dA")
    _check_saved(rec, x)


def test_layer_with_dropout_saves_no_mask():
    layer = lorakern.LoraLinear(torch.nn.Linear(K_S, N_S), r=R_S, lora_dropout=0.2, backend="reference")
    layer.train()
    x = torch.randn(M_S, K_S, requires_grad=True)
    rec = SavedRecorder()
    with rec.hooks():
        y = layer(x)
    y.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None
    _check_saved(rec, x)


# ----------------------------------------------------------------------------- M = 0


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0xK", "2x0xK"])
def test_empty_batch(lead, p):
    k, n, r = 11, 13, 3
    x, w, b, A, B = make_inputs(lead, k, n, r)
    leaves = [t.requires_grad_() for t in (x, b, A, B)]
    y = lora_linear(x, w, b, A, B, 2.0, dropout_p=p, seed=5, backend="reference")
    assert y.shape == (*lead, n) and y.dtype == x.dtype
    dx, db, dA, dB = torch.autograd.grad(y, leaves, torch.ones_like(y))
    assert dx.shape == x.shape and dx.numel() == 0
    for name, g, like in (("dbias", db, b), ("dA", dA, A), ("dB", dB, B)):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert torch.equal(g, torch.zeros_like(like)), name


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_nan_inf_in_x_propagate_like_naive(p):
    x, w, b, A, B = make_inputs((9,), 17, 12, 5)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    x[6, 16] = float("-inf")
    y = lora_linear(x, w, b, A, B, 0.7, dropout_p=p, seed=11, backend="reference")
    y_ref = naive(x, w, b, A, B, 0.7, p, 11)
    assert not torch.isfinite(y_ref[[1, 4, 6]]).any() and torch.isfinite(y_ref[[0, 2, 3, 5, 7, 8]]).all()
    assert torch.equal(torch.isfinite(y), torch.isfinite(y_ref))
    assert_close(y, y_ref, RTOL[torch.float32], "y")


@pytest.mark.parametrize("p", [0.0, 0.5], ids=["p0", "p0.5"])
@pytest.mark.parametrize("M", [9, 70], ids=["onepass", "twopass"])
@pytest.mark.parametrize("r", [1, 5])
def test_nan_inf_in_x_propagate_on_the_triton_backend(M, r, p):
    """Kernels pad the rank inside registers; an Inf in x must not turn the padding's
    x·0 into a NaN that spreads over the row (M <= 64 runs the one-launch forward).
    With dropout, x's non-finite elements propagate whether dropped or kept, as torch's."""
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or ops.interpreting()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b, A, B = make_inputs((M,), 17, 12, r)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    x[6, 16] = float("-inf")
    leaves = [t.to(dev).requires_grad_() for t in (x, w, b, A, B)]
    y = lora_linear(*leaves, 0.7, dropout_p=p, seed=8, backend="triton")
    dy = torch.randn(y.shape)
    grads = [g.cpu() for g in torch.autograd.grad(y, leaves, dy.to(dev))]
    y = y.detach().cpu()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, A, B)]
    y_ref = naive(*leaves64, 0.7, p, 8)
    grads_ref = torch.autograd.grad(y_ref, leaves64, dy.double())
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.equal(torch.isinf(y), torch.isinf(y_ref))
    assert_close(y, y_ref, RTOL[torch.float32], "y")
    for name, g, ref in zip(("dx", "dW", "dbias", "dA", "dB"), grads, grads_ref, strict=True):
        assert torch.equal(torch.isnan(g), torch.isnan(ref)), f"{name}: NaN positions differ"
        assert_close(g, ref, RTOL[torch.float32], name)


@pytest.mark.parametrize("p", [0.0, 0.5], ids=["p0", "p0.5"])
def test_nan_in_x_gradients_like_naive(p):
    """With dropout the NaN sits in a dropped element: it still poisons S (as torch's
    dropout, which multiplies by the mask), hence every dB and that column of dA."""
    seed = 3
    x, w, b, A, B = make_inputs((9,), 17, 12, 5)
    row, col = 2, 5
    if p > 0:
        row, col = (~reference.dropout_keep_mask(seed, 9, 17, p)).nonzero()[0].tolist()
    x[row, col] = float("nan")
    leaves = [t.requires_grad_() for t in (x, w, b, A, B)]
    y = lora_linear(*leaves, 0.7, dropout_p=p, seed=seed, backend="reference")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, A, B)]
    grads_ref = torch.autograd.grad(naive(*leaves64, 0.7, p, seed), leaves64, dy.double())
    for name, g, ref in zip(("dx", "dW", "dbias", "dA", "dB"), grads, grads_ref, strict=True):
        assert_close(g, ref, RTOL[torch.float32], name)  # checks non-finite positions agree
    assert torch.isnan(grads[1][:, col]).all() and torch.isfinite(grads[0]).all()
    assert torch.isnan(grads[4]).all()  # dB = s·dYᵀ S: the NaN row of S (dropped or not) reaches all of it


# ----------------------------------------------------------------------------- which grads flow


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
def test_weight_grad_when_requested(p):
    x, w, b, A, B = make_inputs((3, 5), 19, 14, 6)
    leaves = [t.requires_grad_() for t in (x, w, b, A, B)]
    y = lora_linear(*leaves, 1.5, dropout_p=p, seed=8, backend="reference")
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, A, B)]
    naive(*leaves64, 1.5, p, 8).backward(dy.double())
    for name, t, ref in zip(("dx", "dW", "dbias", "dA", "dB"), leaves, leaves64, strict=True):
        assert t.grad is not None, name
        assert_close(t.grad, ref.grad, RTOL[torch.float32], name)


@pytest.mark.parametrize(
    "wanted",
    [("A", "B"), ("x",), ("w",), ("b",), ("A",), ("B",), ("x", "w", "b")],
    ids=lambda w: "+".join(w),
)
def test_grads_only_for_inputs_that_require_them(wanted):
    x, w, b, A, B = make_inputs((7,), 13, 10, 3)
    named = dict(x=x, w=w, b=b, A=A, B=B)
    for key in wanted:
        named[key].requires_grad_()
    y = lora_linear(x, w, b, A, B, 0.5, dropout_p=0.2, seed=4, backend="reference")
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = {k: t.detach().double().requires_grad_() for k, t in named.items()}
    naive(ref["x"], ref["w"], ref["b"], ref["A"], ref["B"], 0.5, 0.2, 4).backward(dy.double())
    for key, t in named.items():
        if key in wanted:
            assert t.grad is not None, key
            assert_close(t.grad, ref[key].grad, RTOL[torch.float32], "d" + key)
        else:
            assert t.grad is None, key


def test_grad_dtypes_follow_inputs_bf16_base_fp32_adapters():
    x, w, b, A, B = make_inputs((2, 6), 21, 18, 4, torch.bfloat16, torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b, A, B)]
    y = lora_linear(*leaves, 2.0, dropout_p=0.1, seed=9, backend="reference")
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, A, B)]
    naive(*leaves64, 2.0, 0.1, 9).backward(dy.double())
    for name, t, ref in zip(("dx", "dW", "dbias", "dA", "dB"), leaves, leaves64, strict=True):
        assert t.grad.dtype == t.dtype, f"{name}: {t.grad.dtype} != {t.dtype}"
        assert_close(t.grad, ref.grad, RTOL[torch.bfloat16], name)


def test_no_bias():
    x, w, _, A, B = make_inputs((5,), 9, 7, 2)
    x.requires_grad_()
    y = lora_linear(x, w, None, A, B, 0.5, backend="reference")
    assert_close(y, naive(x.detach(), w, None, A, B, 0.5), RTOL[torch.float32], "y")


def test_non_contiguous_x():
    x, w, b, A, B = make_inputs((11, 6), 10, 8, 3)
    x.requires_grad_()
    xt = x.transpose(0, 1)  # [6, 11, K], not contiguous
    assert not xt.is_contiguous()
    y = lora_linear(xt, w, b, A, B, 0.5, dropout_p=0.2, seed=1, backend="reference")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y_ref = naive(x64.transpose(0, 1), w, b, A, B, 0.5, 0.2, 1)
    (dx_ref,) = torch.autograd.grad(y_ref, x64, dy.double())
    assert_close(y, y_ref, RTOL[torch.float32], "y")
    assert_close(dx, dx_ref, RTOL[torch.float32], "dx")


def test_retain_graph_backward_twice_same_grads():
    x, w, b, A, B = make_inputs((6,), 9, 7, 3)
    leaves = [t.requires_grad_() for t in (x, A, B)]
    y = lora_linear(x, w, b, A, B, 0.5, dropout_p=0.3, seed=2, backend="reference")
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves, dy, retain_graph=True)
    second = torch.autograd.grad(y, leaves, dy)
    for g1, g2 in zip(first, second, strict=True):
        assert torch.equal(g1, g2)


def test_no_grad_forward_same_values():
    x, w, b, A, B = make_inputs((2, 5), 9, 7, 3)
    A.requires_grad_()
    y = lora_linear(x, w, b, A, B, 0.5, dropout_p=0.3, seed=2, backend="reference")
    with torch.no_grad():
        y_ng = lora_linear(x, w, b, A, B, 0.5, dropout_p=0.3, seed=2, backend="reference")
    assert y_ng.grad_fn is None and not y_ng.requires_grad
    assert torch.equal(y.detach(), y_ng)
    # Nothing requiring grad takes the same path as no_grad; a drawn seed is the same draw.
    torch.manual_seed(5)
    y_drawn = lora_linear(x, w, b, A, B, 0.5, dropout_p=0.3, backend="reference")
    torch.manual_seed(5)
    y_plain = lora_linear(x, w, b, A.detach(), B, 0.5, dropout_p=0.3, backend="reference")
    assert y_drawn.requires_grad and not y_plain.requires_grad
    assert torch.equal(y_drawn.detach(), y_plain)


# ----------------------------------------------------------------------------- backend dispatch

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only a device object: resolve_backend needs no GPU


def test_auto_on_cpu_is_reference(switches):
    switches(LORAKERN_BACKEND=None)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert ops.resolve_backend("auto", CPU, dtype) == "reference"


def test_auto_on_cuda_is_triton_for_supported_dtypes(switches):
    switches(LORAKERN_BACKEND=None)
    if not ops.triton_available()[0]:
        pytest.skip("needs triton importable")
    assert ops.resolve_backend("auto", CUDA, torch.bfloat16) == "triton"
    assert ops.resolve_backend("auto", CUDA, torch.float64) == "reference"


def test_env_overrides_auto_only(switches):
    switches(LORAKERN_BACKEND="reference")
    assert ops.resolve_backend("auto", CUDA, torch.float16) == "reference"
    switches(LORAKERN_BACKEND="triton")
    switches(TRITON_INTERPRET="1")
    assert ops.resolve_backend("auto", CPU, torch.float32) == "triton"
    # An explicit backend= wins over the environment.
    assert ops.resolve_backend("reference", CPU, torch.float32) == "reference"


def test_env_bad_value(switches):
    with pytest.raises(ValueError, match=r"LORAKERN_BACKEND.*'cuda-please'"):
        switches(LORAKERN_BACKEND="cuda-please")


def test_triton_on_cpu_needs_interpreter(switches):
    if not ops.triton_available()[0]:
        pytest.skip("needs triton importable")
    switches(TRITON_INTERPRET=None)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", CPU, torch.float32)
    switches(TRITON_INTERPRET="0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", CPU, torch.float32)
    # The same through the env override and through lora_linear itself.
    switches(LORAKERN_BACKEND="triton")
    x, w, b, A, B = make_inputs((3,), 8, 5, 2)
    with pytest.raises(RuntimeError, match="backend='reference' on CPU"):
        lora_linear(x, w, b, A, B, 1.0)
    switches(TRITON_INTERPRET="1")
    assert ops.resolve_backend("triton", CPU, torch.float32) == "triton"


class _Spy:
    """Stands in for an implementation module: records calls, computes with the reference."""

    def __init__(self):
        self.calls: list[str] = []

    def module(self) -> SimpleNamespace:
        def fwd(*args):
            self.calls.append("forward")
            return reference.lora_linear_forward(*args)

        def bwd(*args):
            self.calls.append("backward")
            return reference.lora_linear_backward(*args)

        return SimpleNamespace(lora_linear_forward=fwd, lora_linear_backward=bwd)


@pytest.mark.parametrize("env", [None, "reference", "triton"])
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_lora_linear_runs_the_resolved_backend(monkeypatch, env, backend, switches):
    """The op really calls the implementation resolve_backend names (kernels replaced by a spy)."""
    if env is None:
        switches(LORAKERN_BACKEND=None)
    else:
        switches(LORAKERN_BACKEND=env)
    switches(TRITON_INTERPRET="1")
    kern_spy, ref_spy = _Spy(), _Spy()
    monkeypatch.setattr(op_core, "_kernels", kern_spy.module)
    monkeypatch.setattr(op_core, "reference", ref_spy.module())
    x, w, b, A, B = make_inputs((4,), 8, 6, 2)
    A.requires_grad_()
    y = lora_linear(x, w, b, A, B, 1.0, backend=backend)
    y.sum().backward()
    expected = backend if backend != "auto" else (env or "reference")
    if expected == "triton":
        assert kern_spy.calls == ["forward", "backward"] and ref_spy.calls == []
    else:
        assert ref_spy.calls == ["forward", "backward"] and kern_spy.calls == []
    assert_close(y, naive(x, w, b, A.detach(), B, 1.0), RTOL[torch.float32], "y")


# ----------------------------------------------------------------------------- weight=None


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("lead", [(9,), (2, 35)], ids=["onepass-size", "3d"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_weight_none_is_the_lora_term_alone(backend, lead, p):
    """weight=None (no base GEMM, used for extra adapters): y = s·(D(x) Aᵀ) Bᵀ, and the
    grads of x, A and B are those of that term (fp64 naive formula on a zero weight)."""
    if backend == "triton":
        pytest.importorskip("triton")
        if not (torch.cuda.is_available() or ops.interpreting()):
            pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dev = backend_device(backend)
    x, w, _, A, B = make_inputs(lead, 21, 11, 3)
    leaves = [t.to(dev).requires_grad_() for t in (x, A, B)]
    y = lora_linear(leaves[0], None, None, leaves[1], leaves[2], 0.7, dropout_p=p, seed=9, backend=backend)
    assert y.shape == (*lead, 11)
    dy = torch.randn(y.shape)
    grads = torch.autograd.grad(y, leaves, dy.to(dev))
    l64 = [t.detach().double().requires_grad_() for t in (x, A, B)]
    ref = naive(l64[0], torch.zeros(11, 21, dtype=torch.float64), None, l64[1], l64[2], 0.7, p, seed=9)
    ref_grads = torch.autograd.grad(ref, l64, dy.double())
    assert_close(y.cpu(), ref, RTOL[torch.float32], "y")
    for g, r, name in zip(grads, ref_grads, ["dx", "dA", "dB"]):
        assert_close(g.cpu(), r, RTOL[torch.float32], name)


def test_weight_none_refuses_a_bias_and_checks_shapes():
    x, _, b, A, B = make_inputs((4,), 8, 6, 2)
    with pytest.raises(ValueError, match="bias needs a weight"):
        lora_linear(x, None, b, A, B, 1.0)
    with pytest.raises(ValueError, match=r"lora_A must be \[r, 8\]"):
        lora_linear(x, None, None, A[:, :5], B, 1.0)


def test_weight_none_through_the_registered_op():
    """opcheck (schema, fake impl, autograd) with weight=None."""
    x, _, _, A, B = make_inputs((2, 3), 8, 6, 2)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    scalars = (torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64),
               torch.tensor(7, dtype=torch.int64))
    torch.library.opcheck(ops.lora_linear_fwd, (x, None, None, A, B, *scalars, "reference"))


# ----------------------------------------------------------------------------- apply_function


@pytest.mark.parametrize("bias", [True, False, "no-weight"], ids=["bias", "nobias", "noweight"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
def test_apply_function_is_the_autograd_function(bias, p):
    """ops.apply_function (the C apply; torch's Python wrapper skipped) gives what
    LoraLinearFunction.apply gives: the output, the backward node, every gradient, bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    W = None if bias == "no-weight" else torch.randn(12, 16, requires_grad=True)
    b = torch.randn(12, requires_grad=True) if bias is True else None
    A = torch.randn(4, 16, requires_grad=True)
    B = torch.randn(12, 4, requires_grad=True)
    dy = torch.randn(3, 5, 12)
    args = (x, W, b, A, B, 0.5, p, 1234, "reference")
    results = []
    for apply in (ops.LoraLinearFunction.apply, ops.apply_function):
        y = apply(*args)
        assert type(y.grad_fn).__name__ == "LoraLinearFunctionBackward"
        inputs = [t for t in (x, W, b, A, B) if t is not None]
        results.append((y, *torch.autograd.grad(y, inputs, dy)))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_apply_function_keeps_the_functorch_route():
    """Under a functorch transform apply_function leaves the call to torch's apply, which
    refuses a Function without setup_context (rather than the C apply running on wrappers)."""
    x, W, A, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: lora_linear(x, W, None, A, B, 0.5).sum())(x)


def test_function_apply_wrapper_is_what_apply_function_replicates():
    """apply_function replicates torch.autograd.Function.apply for a Function without
    setup_context: unwrap dead functorch wrappers, else functorch's route. If this fails, torch
    changed that wrapper: re-read it and update (or drop) apply_function."""
    import inspect

    from torch.autograd.function import _is_setup_context_defined

    source = inspect.getsource(torch.autograd.Function.apply)
    for step in ("_is_setup_context_defined(cls.setup_context)", "_are_functorch_transforms_active()",
                 "unwrap_dead_wrappers(args)", "super().apply(*args, **kwargs)", "custom_function_call"):
        assert step in source, step
    assert not _is_setup_context_defined(ops.LoraLinearFunction.setup_context)
    assert ops._C_APPLY is not None  # this torch exposes the C apply: the fast route is taken
