"""Every kernel launcher is blind to memory layout: same values, same bits.

For each launcher and each of its tensor arguments, the argument is rebuilt with the
same values in another layout — transposed storage, a step-2 slice of a larger tensor
(the gaps NaN-filled, so a read through the wrong stride shows), an odd storage offset
(3 elements: the pointer loses its 16-byte alignment), and for bias and dy a stride-0
expansion of one element (`dy` of `y.sum().backward()` is one) — and the result must be
torch.equal to the launcher's result on contiguous arguments: a kernel that reads
through its strides does the same arithmetic in the same order whatever they are.
(Only where an argument in another layout reaches cuBLAS, on CUDA, is the dtype's
tolerance used instead: see _rtol.)

Then the layer: an nn.Linear whose bias Parameter is a strided view or an expansion
(the forward kernel once read `bias_ptr + rn`, ignoring the bias's stride).

On a machine without a GPU these run in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tests.conftest import HAS_CUDA, KERNEL_DEVICE, requires_triton
from tests.kernel_cases import DTYPE_IDS, randn
from tests.utils import RTOL, assert_close, rel_error

pytest.importorskip("triton")

pytestmark = requires_triton

M, K, N, R = 37, 70, 45, 5  # odd, not multiples of any block: every mask is exercised
SCALING = 0.75
SEED = 1234
BIAS_VALUE = 0.3  # the one value an expanded bias repeats
DY_VALUE = -1.25  # likewise for dy


def _kernels():
    from lorakern import kernels

    return kernels


# ----------------------------------------------------------------------------- layouts


def transposed(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major storage (strides (1, rows))."""
    return t.t().contiguous().t() if t.dim() == 2 else t


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, every other element of a NaN-filled tensor twice as wide."""
    big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
    view = big[..., ::2]
    view.copy_(t)
    return view


def offset(t: torch.Tensor) -> torch.Tensor:
    """Same values, contiguous but 3 elements into a NaN-filled storage (unaligned pointer)."""
    flat = torch.full((t.numel() + 3,), float("nan"), dtype=t.dtype, device=t.device)
    view = flat[3:].view(t.shape)
    view.copy_(t)
    return view


def expanded(t: torch.Tensor) -> torch.Tensor:
    """Same values (all equal to t's first element), stride 0 in every dimension."""
    first = t.reshape(-1)[0]
    assert torch.equal(t, first.expand(t.shape)), "an expanded layout needs a constant tensor"
    return first.clone().expand(t.shape)


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "transposed": transposed, "strided": strided, "offset": offset, "expanded": expanded,
}
EXPANDABLE = ("bias", "dy")  # the arguments an "expanded" layout applies to


def test_layouts_keep_values_and_change_strides():
    """The helpers themselves: equal values, and really another layout."""
    t = torch.randn(4, 6)
    for name, fn in LAYOUTS.items():
        src = torch.full_like(t, 2.0) if name == "expanded" else t
        out = fn(src)
        assert torch.equal(out, src), name
        assert out.stride() != src.stride() or out.storage_offset() != 0, name
    b = torch.randn(9)
    assert strided(b).stride() == (2,) and offset(b).storage_offset() == 3


# ----------------------------------------------------------------------------- launcher cases


def make_inputs(dtype: torch.dtype, constant: bool) -> dict[str, torch.Tensor]:
    """Contiguous arguments of every launcher; bias and dy constant when `constant`
    (the inputs of the "expanded" layout)."""
    dev = KERNEL_DEVICE
    t = {
        "x": randn(M, K, dtype=dtype, device=dev),
        "weight": randn(N, K, dtype=dtype, device=dev),
        "bias": randn(N, dtype=dtype, device=dev),
        "lora_A": randn(R, K, dtype=dtype, device=dev),
        "lora_B": randn(N, R, dtype=dtype, device=dev),
        "S": randn(M, R, dtype=torch.float32, device=dev),
        "dS": randn(M, R, dtype=torch.float32, device=dev),
        "dy": randn(M, N, dtype=dtype, device=dev),
    }
    if constant:
        t["bias"] = torch.full((N,), BIAS_VALUE, dtype=dtype, device=dev)
        t["dy"] = torch.full((M, N), DY_VALUE, dtype=dtype, device=dev)
    return t


@dataclass(frozen=True)
class Case:
    """One launcher call: `run(tensors, p)` -> output(s); `args` the tensors it takes;
    `torch_gemm` those it hands to torch's own GEMM (F.linear, dy @ W) in that variant."""

    name: str
    args: tuple[str, ...]
    run: Callable[[dict, float], object]
    has_dropout: bool = True
    torch_gemm: tuple[str, ...] = ()
    composite: bool = False  # calls the launchers above: one dtype is enough


CASES = [
    Case("shrink", ("x", "lora_A"), lambda t, p: _kernels().lora_shrink(t["x"], t["lora_A"], p, SEED)),
    Case(
        "forward_fused", ("x", "weight", "bias", "S", "lora_B"),
        lambda t, p: _kernels().lora_forward_fused(t["x"], t["weight"], t["bias"], t["S"], t["lora_B"], SCALING),
        has_dropout=False,
    ),
    Case(
        "forward_unfused", ("x", "weight", "bias", "S", "lora_B"),
        lambda t, p: _kernels().lora_forward_unfused(t["x"], t["weight"], t["bias"], t["S"], t["lora_B"], SCALING),
        has_dropout=False, torch_gemm=("x", "weight", "bias"),
    ),
    Case(
        "forward_lora_only", ("x", "S", "lora_B"),
        lambda t, p: _kernels().lora_forward_unfused(t["x"], None, None, t["S"], t["lora_B"], SCALING),
        has_dropout=False,
    ),
    Case(
        "forward_onepass", ("x", "weight", "bias", "lora_A", "lora_B"),
        lambda t, p: _kernels().lora_forward_onepass(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, p, SEED),
    ),
    Case(
        "forward_onepass_cublas", ("x", "weight", "bias", "lora_A", "lora_B"),
        lambda t, p: _kernels().lora_forward_onepass(
            t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, p, SEED, cublas_base=True
        ),
        torch_gemm=("x", "weight", "bias"),
    ),
    Case(
        "backward_dsdb", ("dy", "lora_B", "S"),
        lambda t, p: _kernels().lora_backward_dsdb(t["dy"], t["lora_B"], t["S"], SCALING),
        has_dropout=False,
    ),
    Case(
        "backward_dx_fused", ("dy", "weight", "dS", "lora_A"),
        lambda t, p: _kernels().lora_backward_dx(t["dy"], t["weight"], t["dS"], t["lora_A"], p, SEED, fused=True),
    ),
    Case(
        "backward_dx_unfused", ("dy", "weight", "dS", "lora_A"),
        lambda t, p: _kernels().lora_backward_dx(t["dy"], t["weight"], t["dS"], t["lora_A"], p, SEED, fused=False),
        torch_gemm=("dy", "weight"),
    ),
    Case("backward_da", ("dS", "x", "lora_A"), lambda t, p: _kernels().lora_backward_da(t["dS"], t["x"], t["lora_A"], p, SEED)),
    Case(
        "linear_forward", ("x", "weight", "bias", "lora_A", "lora_B"),
        lambda t, p: _kernels().lora_linear_forward(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, p, SEED),
        composite=True,
    ),
    Case(
        "linear_backward", ("dy", "x", "weight", "lora_A", "lora_B", "S"),
        lambda t, p: _kernels().lora_linear_backward(
            t["dy"], t["x"], t["weight"], t["lora_A"], t["lora_B"], t["S"], SCALING, p, SEED, (True, True, True)
        ),
        composite=True,
    ),
]


def _outputs(result) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]


def _mismatch(case: str, what: str, got, want, rtol: float | None = None) -> list[str]:
    """Every output of `got` that differs from `want`'s, described: any bit when `rtol` is
    None, else a relative error above `rtol` or a non-finite value."""
    got, want = _outputs(got), _outputs(want)
    if len(got) != len(want):
        return [f"{case} with {what}: {len(got)} outputs, expected {len(want)}"]
    found = []
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append(f"{case} with {what}: output {i} is {a.dtype}{tuple(a.shape)}, expected {b.dtype}{tuple(b.shape)}")
            continue
        if torch.equal(a, b):
            continue
        a64, b64 = a.double().cpu(), b.double().cpu()
        err = rel_error(a64.nan_to_num(float("inf")), b64)
        if rtol is not None and err <= rtol:
            continue
        differ = ~((a64 == b64) | (a64.isnan() & b64.isnan()))
        idx = tuple(differ.nonzero()[0].tolist())
        found.append(
            f"{case} with {what}: output {i} differs in {int(differ.sum())}/{a.numel()} elements "
            f"(relative error {err:.3g}{'' if rtol is None else f' > {rtol:.1e}'}; "
            f"at {idx}: {a64[idx].item():.9g} vs {b64[idx].item():.9g}; NaNs: {int(a64.isnan().sum())})"
        )
    return found


def _rtol(case: Case, relaid: set[str], dtype: torch.dtype) -> float | None:
    """None (bit-equality) unless an argument in another layout reaches cuBLAS: cuBLAS
    picks its kernel, and so its summation order, by its operands' layout (a strided bias
    also moves F.linear off cuBLASLt's bias epilogue), so there the dtype's tolerance.
    CPU torch GEMMs give the same bits for every layout, so the interpreter run is exact."""
    return RTOL[dtype] if HAS_CUDA and relaid & set(case.torch_gemm) else None


def _params():
    """(case, layout, dtype, p): transposed and strided in fp32 and bf16, dropout 0 and 0.3
    where the launcher takes p; the rarer offset and expanded layouts, and the composite
    launchers, in bf16 alone (the 3-element offset leaves the pointer 6 bytes off
    alignment); the rarer layouts with dropout on only."""
    out = []
    for case in CASES:
        for layout in LAYOUTS:
            if layout == "expanded" and not set(case.args) & set(EXPANDABLE):
                continue
            common = layout in ("transposed", "strided")
            dtypes = (torch.float32, torch.bfloat16) if common and not case.composite else (torch.bfloat16,)
            ps = ((0.0, 0.3) if common else (0.3,)) if case.has_dropout else (0.0,)
            for dt in dtypes:
                for p in ps:
                    out.append(pytest.param(case, layout, dt, p, id=f"{case.name}-{layout}-{DTYPE_IDS[dt]}-p{p}"))
    return out


@pytest.mark.parametrize(("case", "layout", "dtype", "p"), _params())
def test_launcher_result_is_independent_of_layout(case: Case, layout: str, dtype: torch.dtype, p: float, switches):
    """Each tensor argument alone in `layout`, then all of them at once: bit-identical
    outputs to the call on contiguous arguments (see _rtol for cuBLAS's operands).

    LORAKERN_FUSED_GEMM=1: on CUDA, lora_linear_forward/backward run their Triton GEMMs
    (as under the interpreter) rather than the measured choice, which may be cuBLAS."""
    switches(LORAKERN_FUSED_GEMM="1")
    tensors = make_inputs(dtype, constant=layout == "expanded")
    want = case.run(tensors, p)
    names = [a for a in case.args if layout != "expanded" or a in EXPANDABLE]
    relaid = {a: LAYOUTS[layout](tensors[a]) for a in names}
    failures = []
    for a in names:
        got = case.run({**tensors, a: relaid[a]}, p)
        failures += _mismatch(case.name, f"{a} {layout}", got, want, _rtol(case, {a}, dtype))
    if len(names) > 1:
        got = case.run({**tensors, **relaid}, p)
        failures += _mismatch(case.name, f"all of {names} {layout}", got, want, _rtol(case, set(names), dtype))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("variant", ["fused", "unfused", "onepass", "onepass_cublas"])
def test_bias_with_any_stride(variant):
    """The bias alone, in fp32, in every layout at once incl. a stride of 3 and a 1-D
    slice that starts mid-tensor — the case the forward kernel once got wrong (it read
    bias_ptr + rn): the result must be the contiguous bias's."""
    t = make_inputs(torch.float32, constant=False)
    k = _kernels()

    def run(bias):
        if variant == "fused":
            return k.lora_forward_fused(t["x"], t["weight"], bias, t["S"], t["lora_B"], SCALING)
        if variant == "unfused":
            return k.lora_forward_unfused(t["x"], t["weight"], bias, t["S"], t["lora_B"], SCALING)
        return k.lora_forward_onepass(
            t["x"], t["weight"], bias, t["lora_A"], t["lora_B"], SCALING, 0.0, SEED, cublas_base=variant == "onepass_cublas"
        )

    bias = t["bias"]
    want = run(bias)
    rtol = RTOL[torch.float32] if HAS_CUDA and variant in ("unfused", "onepass_cublas") else None  # F.linear's bias: _rtol
    stride3 = torch.full((3 * N,), float("nan"), device=bias.device)
    stride3[1::3] = bias
    biases = {"stride 2": strided(bias), "stride 3 from element 1": stride3[1::3], "offset 3": offset(bias)}
    failures = []
    for what, b in biases.items():
        failures += _mismatch(variant, f"bias {what}", run(b), want, rtol)
    const = torch.full((N,), BIAS_VALUE, device=bias.device)
    failures += _mismatch(variant, "bias expanded", run(torch.tensor(BIAS_VALUE, device=bias.device).expand(N)), run(const), rtol)
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- the layer


LAYER_K, LAYER_N = 70, 45


def _with_bias(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """An nn.Linear on bias's device holding `weight` (copied) and `bias` as is (its layout kept)."""
    base = nn.Linear(LAYER_K, LAYER_N, device=bias.device)
    with torch.no_grad():
        base.weight.copy_(weight)
    base.bias = nn.Parameter(bias)
    return base


def _noncontiguous_bias(layout: str, values: torch.Tensor, device) -> torch.Tensor:
    """`values` [LAYER_N] as every other element of a NaN-filled tensor, or (layout
    "expanded", values ignored) BIAS_VALUE expanded to [LAYER_N] from one element."""
    if layout == "strided":
        big = torch.full((2 * LAYER_N,), float("nan"), device=device)
        big[::2] = values
        return big[::2]
    return torch.tensor(BIAS_VALUE, device=device).expand(LAYER_N)


def _layer(base: nn.Linear, backend: str, random_ab: bool):
    from lorakern import LoraLinear

    layer = LoraLinear(base, r=4, lora_alpha=8, backend=backend)
    if random_ab:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for mod in (layer.lora_A["default"], layer.lora_B["default"]):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
    return layer


@pytest.mark.parametrize("M_rows", [37, 101], ids=lambda m: f"M{m}")  # one-pass and two-pass forward
@pytest.mark.parametrize("bias_layout", ["strided", "expanded"])
def test_layer_with_noncontiguous_bias(bias_layout, M_rows, switches):
    """LoraLinear on the Triton backend over an nn.Linear whose bias Parameter is a
    step-2 slice or a stride-0 expansion.

    Fresh (B = 0): the output is the base layer's up to the GEMM's summation order, and
    bit-identical to the output over a contiguous copy of the same bias. Random A and B:
    forward and every gradient match the reference backend (on CPU, same bias layout).
    LORAKERN_FUSED_GEMM=1: the Triton GEMMs, which read the bias themselves, also on CUDA
    (the cuBLAS variant hands the bias to F.linear)."""
    switches(LORAKERN_FUSED_GEMM="1")
    W, b = torch.randn(LAYER_N, LAYER_K), torch.randn(LAYER_N)
    bias = _noncontiguous_bias(bias_layout, b, KERNEL_DEVICE)
    base = _with_bias(W, bias)
    assert base.bias.stride() in ((2,), (0,))
    x = torch.randn(M_rows, LAYER_K)
    xd = x.to(KERNEL_DEVICE)

    y = _layer(base, "triton", random_ab=False)(xd)
    assert_close(y, base(xd), 1e-5, "fresh layer vs base layer")
    y_contig = _layer(_with_bias(W, bias.detach().clone()), "triton", random_ab=False)(xd)
    assert torch.equal(y, y_contig), "fresh layer: non-contiguous bias gives another output than a contiguous one"

    tri = _layer(_with_bias(W, _noncontiguous_bias(bias_layout, b, KERNEL_DEVICE)), "triton", random_ab=True)
    ref = _layer(_with_bias(W, _noncontiguous_bias(bias_layout, b, "cpu")), "reference", random_ab=True)
    xt, xr = xd.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yr = tri(xt), ref(xr)
    assert_close(yt, yr, RTOL[torch.float32], "y")
    g = torch.randn_like(yr)
    yt.backward(g.to(KERNEL_DEVICE))
    yr.backward(g)
    assert_close(xt.grad, xr.grad, RTOL[torch.float32], "dx")
    for name in ("lora_A", "lora_B"):
        got = getattr(tri, name)["default"].weight.grad
        want = getattr(ref, name)["default"].weight.grad
        assert_close(got, want, RTOL[torch.float32], f"d{name}")
