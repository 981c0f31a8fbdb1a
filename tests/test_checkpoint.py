"""Activation checkpointing with dropout: the recomputed forward regenerates the same mask.

With seed=None the forward op draws its dropout seed from torch's CPU generator; the
checkpoint stashes the CPU RNG state before the forward and restores it before the
recomputation, so the same seed (and mask) comes back and the gradients equal the
non-checkpointed run's exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import lorakern.layer
from lorakern import op_core, ops
from tests.conftest import backend_device, requires_cuda
from tests.training_utils import K, tiny_lora_model
from tests.utils import RTOL, assert_close

MODES = [True, False]
MODE_IDS = ["reentrant", "non-reentrant"]


class _SeedSpy:
    """Records the dropout seed each backend call gets: forward and recomputation
    (`fwd`), and backward (`bwd`). Spies below the custom op, so a recomputation that
    checkpoint stops early (inside the op's autograd setup) is still recorded."""

    def __init__(self, monkeypatch):
        self.fwd: list[int] = []
        self.bwd: list[int] = []
        real = op_core.implementation
        spy = self

        class Impl:
            def __init__(self, backend):
                self.impl = real(backend)

            def lora_linear_forward(self, *args, **kwargs):  # kwargs: need_S (no-grad calls)
                spy.fwd.append(args[-1])
                return self.impl.lora_linear_forward(*args, **kwargs)

            def lora_linear_backward(self, *args):
                spy.bwd.append(args[-2])
                return self.impl.lora_linear_backward(*args)

        monkeypatch.setattr(op_core, "implementation", Impl)
        monkeypatch.setattr(lorakern.layer, "implementation", Impl)  # LoraLinear's direct no-grad call


def _grads(model, x, *, use_reentrant=None, per_layer=False, preserve_rng_state=True, seed=21):
    """Forward (optionally checkpointed) + backward of mean(out²) -> (out, {name: grad}, x.grad)."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    if use_reentrant is None:
        out = model(x)
    elif per_layer:
        h = checkpoint(model.up, x, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state)
        out = checkpoint(lambda t: model.down(torch.relu(t)), h, use_reentrant=use_reentrant,
                         preserve_rng_state=preserve_rng_state)
    else:
        out = checkpoint(model, x, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, x.grad


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole-model", "per-layer"])
@pytest.mark.parametrize("use_reentrant", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_checkpointed_grads_equal_plain_grads_exactly(backend, use_reentrant, per_layer, monkeypatch):
    device = backend_device(backend)
    model = tiny_lora_model(dropout=0.3, backend=backend, device=device).train()
    x = torch.randn(3, 7, K, device=device)
    out, grads, dx = _grads(model, x)
    spy = _SeedSpy(monkeypatch)
    out_ck, grads_ck, dx_ck = _grads(model, x, use_reentrant=use_reentrant, per_layer=per_layer)
    # Each LoraLinear ran twice (forward, then recomputation in backward) with one seed,
    # and its backward got that seed.
    assert len(spy.fwd) == 4 and len(spy.bwd) == 2, (spy.fwd, spy.bwd)
    forward_seeds, recomputed_seeds = spy.fwd[:2], spy.fwd[2:]
    assert forward_seeds[0] != forward_seeds[1]
    assert sorted(recomputed_seeds) == sorted(forward_seeds) == sorted(spy.bwd)
    assert torch.equal(out_ck, out)
    assert grads_ck.keys() == grads.keys() and len(grads) == 4
    for name in grads:
        assert torch.equal(grads_ck[name], grads[name]), name
    assert torch.equal(dx_ck, dx)


@pytest.mark.parametrize("use_reentrant", MODES, ids=MODE_IDS)
def test_without_rng_restore_the_mask_differs(use_reentrant):
    """Control: with preserve_rng_state=False the recomputation draws a fresh seed, so the
    adapter grads no longer match (the equality above is not vacuous)."""
    model = tiny_lora_model(dropout=0.3).train()
    x = torch.randn(3, 7, K)
    _, grads, _ = _grads(model, x)
    _, grads_ck, _ = _grads(model, x, use_reentrant=use_reentrant, preserve_rng_state=False)
    assert not torch.equal(grads_ck["up.lora_A.default.weight"], grads["up.lora_A.default.weight"])


@pytest.mark.parametrize("use_reentrant", MODES, ids=MODE_IDS)
def test_checkpoint_with_explicit_seed_and_no_dropout(use_reentrant):
    """Dropout 0 (eval-like) and an explicit seed through the functional: equal too."""
    model = tiny_lora_model(dropout=0.0).train()
    x = torch.randn(2, 5, K)
    out, grads, dx = _grads(model, x)
    out_ck, grads_ck, dx_ck = _grads(model, x, use_reentrant=use_reentrant)
    for name in grads:
        assert_close(grads_ck[name], grads[name], RTOL[torch.float32], name)
    assert torch.equal(out_ck, out) and torch.equal(dx_ck, dx)

    W, A, B = torch.randn(6, K), torch.randn(3, K, requires_grad=True), torch.randn(6, 3, requires_grad=True)

    def f(t):
        return ops.lora_linear(t, W, None, A, B, 0.5, dropout_p=0.4, seed=99)

    xs = torch.randn(4, K, requires_grad=True)
    f(xs).sum().backward()
    ref = (A.grad.clone(), B.grad.clone(), xs.grad.clone())
    A.grad = B.grad = xs.grad = None
    checkpoint(f, xs, use_reentrant=use_reentrant).sum().backward()
    assert torch.equal(A.grad, ref[0]) and torch.equal(B.grad, ref[1]) and torch.equal(xs.grad, ref[2])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_checkpoint_inside_torch_compile(compiler, monkeypatch):
    """torch.compile(fullgraph) of a forward that checkpoints a LoraLinear: the op is tagged
    nondeterministic_seeded, so the compiled recomputation replays the CPU RNG state, gets
    the forward's seed, and the grads equal eager's exactly."""
    model = tiny_lora_model(dropout=0.3).train()

    def forward(x):
        h = checkpoint(model.up, x, use_reentrant=False)
        return model.down(torch.relu(h))

    x = torch.randn(2, 5, K)
    spy = _SeedSpy(monkeypatch)
    results = []
    for fn in (forward, torch.compile(forward, backend=compiler, fullgraph=True)):
        spy.fwd.clear()
        spy.bwd.clear()
        torch.manual_seed(4)
        fn(x).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((grads, sorted(spy.fwd), sorted(spy.bwd)))
        model.zero_grad(set_to_none=True)
    (eager, eager_fwd, eager_bwd), (compiled, compiled_fwd, compiled_bwd) = results
    assert len(compiled_fwd) == 3 and len(set(compiled_fwd)) == 2, compiled_fwd  # up, down, up again
    assert compiled_fwd == eager_fwd and compiled_bwd == eager_bwd
    assert eager.keys() == compiled.keys() and len(eager) == 4
    for name in eager:
        assert torch.equal(compiled[name], eager[name]), name


@requires_cuda
def test_checkpoint_inside_torch_compile_triton_on_cuda():
    """The same on the traced Triton path (lorakern/triton_ops.py): the seed comes from the
    host op device_scalars (nondeterministic_seeded), so the compiled recomputation must
    get the forward's seed; a different mask would change the grads far beyond rounding.
    Compiled dispatch may pick cuBLAS where eager picked the fused GEMM: close, not equal."""
    model = tiny_lora_model(dropout=0.3, backend="triton", device="cuda").train()

    def forward(x):
        h = checkpoint(model.up, x, use_reentrant=False)
        return model.down(torch.relu(h))

    x = torch.randn(2, 5, K, device="cuda")
    results = []
    for fn in (forward, torch.compile(forward, backend="inductor", fullgraph=True)):
        torch.manual_seed(4)
        fn(x).square().mean().backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    eager, compiled = results
    assert eager.keys() == compiled.keys() and len(eager) == 4
    for name in eager:
        assert_close(compiled[name], eager[name], RTOL[torch.float32], name)
