"""kernels.launch: the direct launch path gives the same results as Triton's own launch.

On CPU (the interpreter) the direct path is off and every launch is Triton's. On a GPU
with Triton 3.6 the second call of each specialisation skips Triton's launcher: these
tests call every launcher repeatedly with layouts that change Triton's specialisation
(16-byte alignment of a pointer, a stride of 1 or not, dtypes) and check each result
against the same call with Triton's launcher forced (LORAKERN_FAST_LAUNCH is read at
import, so the comparison turns the module switch off in place).
"""

from __future__ import annotations

import pytest
import torch
import triton

from lorakern import kernels
from lorakern.kernels import launch
from tests.conftest import requires_cuda, requires_triton

pytestmark = requires_triton


def test_direct_path_off_in_the_interpreter():
    if launch.interpreting():
        assert not launch.direct_enabled()


def _every_launcher(x, W, bias, A, B, dy, p):
    """Results of every launcher for one set of inputs (dispatch choices bypassed)."""
    k = kernels
    S = k.lora_shrink(x, A, p, 5)
    out = {"S": S}
    out["fused"] = k.lora_forward_fused(x, W, bias, S, B, 0.5)
    out["unfused"] = k.lora_forward_unfused(x, W, bias, S, B, 0.5)
    out["onepass"], out["onepass_S"] = k.lora_forward_onepass(x[:16], W, bias, A, B, 0.5, p, 5)
    out["onepass_cublas"], _ = k.lora_forward_onepass(x[:16], W, bias, A, B, 0.5, p, 5, cublas_base=True)
    out["dS"], out["dB"] = k.lora_backward_dsdb(dy, B, S, 0.5)
    out["dx_fused"] = k.lora_backward_dx(dy, W, out["dS"], A, p, 5, fused=True)
    out["dx_unfused"] = k.lora_backward_dx(dy, W, out["dS"], A, p, 5, fused=False)
    out["dA"] = k.lora_backward_da(out["dS"], x, A, p, 5)
    return out


def _layouts(M, K, N, r, dtype):
    """Inputs with the same shapes in several layouts (aligned, offset by one element,
    transposed storage), fresh random values each."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, device="cuda", dtype=dt, generator=g)

    def offset(t):  # same values, storage offset of one element: pointer not 16-byte aligned
        flat = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view

    def transposed(t):
        return t.t().contiguous().t()

    base = dict(x=rnd(M, K), W=rnd(N, K), bias=rnd(N), A=rnd(r, K, dt=torch.float32),
                B=rnd(N, r, dt=torch.float32), dy=rnd(M, N))
    yield "aligned", base
    yield "offset", {k: offset(v) for k, v in base.items()}
    yield "transposed", {k: (transposed(v) if v.dim() == 2 else v) for k, v in base.items()}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p25"])
def test_direct_launches_match_triton_launches(monkeypatch, dtype, p):
    """Each launcher, called three times per layout (the later calls on the direct path),
    gives bit-identical results to Triton's own launcher on the same inputs."""
    if not triton.__version__.startswith(launch._CHECKED_TRITON):
        pytest.skip(f"the direct launch path is not used with Triton {triton.__version__}")
    M, K, N, r = 96, 200, 136, 16
    for name, t in _layouts(M, K, N, r, dtype):
        args = (t["x"], t["W"], t["bias"], t["A"], t["B"], t["dy"], p)
        monkeypatch.setattr(launch, "_DIRECT", False)
        expected = _every_launcher(*args)
        monkeypatch.setattr(launch, "_DIRECT", True)
        for _ in range(3):
            got = _every_launcher(*args)
            for key, value in expected.items():
                assert torch.equal(got[key], value), f"{name}: {key} differs on the direct path"
    torch.cuda.synchronize()
    assert launch._compiled, "the direct path cached no kernel"
