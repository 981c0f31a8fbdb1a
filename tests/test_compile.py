"""torch.compile of LoRA-injected models: no graph breaks, eager-equal, no recompiles.

The op is registered with torch.library (lorakern::lora_linear_fwd / _bwd, fake impls,
autograd); to the compiler each call is one opaque node on either backend. On CPU the
reference backend runs under inductor, and the Triton backend (interpreter) under
aot_eager; on CUDA the Triton backend runs under inductor and inside a CUDA graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing

from lorakern import op_core, ops
from tests.conftest import backend_device, requires_cuda
from tests.training_utils import K, lora_layers, tiny_lora_model, train_step
from tests.utils import RTOL, assert_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_same_step(compiled, eager, x, seed, dtype=torch.float32):
    out_c, grads_c = train_step(compiled, x, seed)
    out_e, grads_e = train_step(eager, x, seed)
    assert_close(out_c, out_e, RTOL[dtype], "out")
    assert grads_c.keys() == grads_e.keys() and len(grads_c) == 4
    for name in grads_e:
        assert_close(grads_c[name], grads_e[name], RTOL[dtype], name)
    return out_c


# ----------------------------------------------------------------------------- opcheck


def _op_args(lead, bias, p, x_dtype=torch.float32, adapter_dtype=torch.float32, backend="reference"):
    m_k = (*lead, 12)
    x = torch.randn(m_k, dtype=x_dtype, requires_grad=True)
    w = torch.randn(10, 12, dtype=x_dtype, requires_grad=True)
    b = torch.randn(10, dtype=x_dtype, requires_grad=True) if bias else None
    A = torch.randn(3, 12, dtype=adapter_dtype, requires_grad=True)
    B = torch.randn(10, 3, dtype=adapter_dtype, requires_grad=True)
    scalars = (torch.tensor(0.7, dtype=torch.float64), torch.tensor(p, dtype=torch.float64),
               torch.tensor(1234, dtype=torch.int64))
    return (x, w, b, A, B, *scalars, backend)


# The Triton backend runs on CUDA, or on CPU in the interpreter.
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() or ops.interpreting()), reason="needs a GPU or TRITON_INTERPRET=1"))]


def _device_args(args, backend):
    """The op's arguments on the backend's device (scalars, 0-d, stay on the CPU)."""
    device = backend_device(backend)
    if device == "cpu":
        return args
    return tuple(a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.dim() > 0 else a
                 for a in args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lead, bias, p, x_dtype",
    [((5,), True, 0.0, torch.float32), ((2, 3), False, 0.25, torch.float32), ((4,), True, 0.25, torch.bfloat16)],
    ids=["2d-bias", "3d-dropout", "bf16-dropout"],
)
def test_opcheck_forward_op(lead, bias, p, x_dtype, backend):
    """Schema, fake impl, autograd registration and AOT dispatch of lora_linear_fwd (fp32 adapters)."""
    args = _device_args(_op_args(lead, bias, p, x_dtype, backend=backend), backend)
    torch.library.opcheck(ops.lora_linear_fwd, args)


def test_opcheck_forward_op_draws_seed_from_generator():
    """seed=None: the op draws the seed from the CPU generator; manual_seed reproduces it."""
    args = list(_op_args((6,), True, 0.5))
    args[7] = None
    torch.manual_seed(5)
    y1, _, s1 = ops.lora_linear_fwd(*args)
    torch.manual_seed(5)
    y2, _, s2 = ops.lora_linear_fwd(*args)
    assert int(s1) == int(s2) and torch.equal(y1, y2)
    torch.manual_seed(5)
    assert int(s1) == op_core.draw_seed()
    y3, _, s3 = ops.lora_linear_fwd(*args)  # generator moved on: new seed, new mask
    assert int(s3) != int(s1) and not torch.equal(y3, y1)
    # Dropout off: no draw, seed 0, generator untouched.
    args[6] = torch.tensor(0.0, dtype=torch.float64)
    torch.manual_seed(5)
    _, _, s0 = ops.lora_linear_fwd(*args)
    assert int(s0) == 0 and op_core.draw_seed() == int(s1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward_op(backend):
    x, w, _, A, B, s, p, seed, backend = _device_args(_op_args((2, 3), False, 0.25, backend=backend), backend)
    y, S, seed_out = ops.lora_linear_fwd(x, w, None, A, B, s, p, seed, backend)
    dy = torch.randn_like(y)
    for needs in [(True, True, True), (False, True, False)]:
        torch.library.opcheck(
            ops.lora_linear_bwd,
            (dy, x.detach(), w.detach(), A.detach(), B.detach(), S, s, p, seed_out, backend, *needs),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_function_and_registered_op_agree_exactly(backend):
    """lora_linear runs an autograd.Function in eager mode and the registered op when
    traced; both share the math and draw the seed alike: same outputs and grads, bit for bit."""
    args = _device_args(_op_args((2, 3), True, 0.25), backend)
    x, w, b, A, B = args[:5]
    leaves = [x, w, b, A, B]
    results = []
    for use_op in (False, True):
        torch.manual_seed(8)
        if use_op:
            y = ops.lora_linear_fwd(x, w, b, A, B, args[5], args[6], None, backend)[0]
        else:
            y = ops.lora_linear(x, w, b, A, B, 0.7, dropout_p=0.25, backend=backend)
        results.append((y, *torch.autograd.grad(y.square().sum(), leaves)))
    for eager, op in zip(*results, strict=True):
        assert torch.equal(eager, op)


# ----------------------------------------------------------------------------- graph breaks


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_breaks(backend):
    """dynamo.explain: one graph, no break, each LoraLinear is one lorakern op node."""
    model = tiny_lora_model(dropout=0.25, backend=backend, device=backend_device(backend)).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, K, device=backend_device(backend)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    nodes = [n for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum(n.target is torch.ops.lorakern.lora_linear_fwd.default for n in nodes) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_aot_eager_matches_eager(backend):
    """fullgraph=True through AOTAutograd (fake impls, autograd registration, functionalisation):
    outputs and every adapter grad equal eager's, dropout on, same seed."""
    model = tiny_lora_model(dropout=0.25, backend=backend, device=backend_device(backend)).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _assert_same_step(compiled, model, torch.randn(2, 5, K, device=backend_device(backend)), seed=3)


def test_fullgraph_under_cpu_autocast():
    """Autocast inside a compiled graph: bf16 output, fp32 adapter grads, equal to eager."""
    model = tiny_lora_model(dropout=0.25).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_c, grads_c = train_step(compiled, x, seed=5)
        out_e, grads_e = train_step(model, x, seed=5)
    assert out_c.dtype == out_e.dtype == torch.bfloat16
    assert_close(out_c, out_e, RTOL[torch.bfloat16], "out")
    assert grads_c.keys() == grads_e.keys() and len(grads_c) == 4
    for name in grads_e:
        assert grads_c[name].dtype == torch.float32
        assert_close(grads_c[name], grads_e[name], RTOL[torch.bfloat16], name)


# ----------------------------------------------------------------------------- inductor, recompiles


def test_inductor_fullgraph_matches_eager_and_never_recompiles():
    """Inductor, fullgraph: eager-equal outputs and grads through a sequence of changes to
    scaling, dropout probability and the adapter weights (an optimizer step), all on one
    compiled graph (frame count stays 1), and each change visible in the output."""
    model = tiny_lora_model(dropout=0.25).train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 5, K)

    def set_scaling(v):
        for layer in lora_layers(model):
            layer.scaling["default"] = v

    def set_dropout(v):
        for layer in lora_layers(model):
            layer.lora_dropout["default"] = v

    def optimizer_step():
        _, grads = train_step(model, x, seed=0)
        for name, p in model.named_parameters():
            if name in grads:
                p.grad = grads[name]
        opt.step()
        opt.zero_grad(set_to_none=True)

    changes = [
        ("initial", lambda: None), ("scaling", lambda: set_scaling(0.5)), ("dropout", lambda: set_dropout(0.5)),
        ("dropout off", lambda: set_dropout(0.0)), ("weights", optimizer_step),
    ]
    previous = None
    for what, change in changes:
        change()
        out = _assert_same_step(compiled, model, x, seed=11)
        assert previous is None or not torch.equal(out, previous), f"{what}: output did not change"
        previous = out
        assert counter.frame_count == 1, f"recompiled after changing {what}"


def test_two_active_adapters_dropout_changes_do_not_recompile():
    """Several active adapters in training: a dropout probability that changes but stays
    positive, and a scaling change, reuse the compiled graph (only a p turning 0 or
    positive may recompile); compiled outputs and all 8 adapter grads equal eager's."""
    model = tiny_lora_model(dropout=0.25).train()
    for layer in lora_layers(model):
        layer.update_layer("b", 3, 6, lora_dropout=0.1, init_lora_weights=False)
        layer.set_adapter(["default", "b"])
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 5, K)

    def same_step(seed):
        out_c, grads_c = train_step(compiled, x, seed)
        out_e, grads_e = train_step(model, x, seed)
        assert_close(out_c, out_e, RTOL[torch.float32], "out")
        assert grads_c.keys() == grads_e.keys() and len(grads_e) == 8
        for name in grads_e:
            assert_close(grads_c[name], grads_e[name], RTOL[torch.float32], name)
        return out_c

    first = same_step(seed=5)
    for layer in lora_layers(model):
        layer.lora_dropout["b"] = 0.4
        layer.scaling["default"] = 0.75
    changed = same_step(seed=5)
    assert not torch.equal(first, changed)
    assert counter.frame_count == 1, "a positive dropout p or a scaling change recompiled"
    for layer in lora_layers(model):
        layer.lora_dropout["b"] = 0.0  # zero-ness flips: a new graph is allowed
    same_step(seed=5)


# ----------------------------------------------------------------------------- CUDA


@requires_cuda
def test_cuda_inductor_triton_matches_eager_and_never_recompiles():
    model = tiny_lora_model(dropout=0.25, backend="triton", device="cuda").train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 33, K, device="cuda")
    _assert_same_step(compiled, model, x, seed=3)
    for layer in lora_layers(model):
        layer.scaling["default"] = 0.25
        layer.lora_dropout["default"] = 0.1
    _assert_same_step(compiled, model, x, seed=4)
    assert counter.frame_count == 1


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cuda_graph_captures_a_training_step(backend):
    """Forward + backward of a LoRA model (dropout 0) captured in a CUDA graph: no host
    sync during capture, and replays on new inputs give eager's outputs and grads."""
    model = tiny_lora_model(backend=backend, device="cuda").train()
    eager = copy.deepcopy(model)
    static_x = torch.randn(8, 33, K, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel dispatch choices, allocator)
        for _ in range(3):
            model(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
        static_out.square().mean().backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for step in range(3):
        x = torch.randn(8, 33, K, device="cuda")
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        out_e, grads_e = train_step(eager, x, seed=step)
        assert_close(static_out, out_e, RTOL[torch.float32], "out")
        for name, g in grads_e.items():
            assert_close(params[name].grad, g, RTOL[torch.float32], name)


@requires_cuda
@pytest.mark.parametrize("train", [False, True], ids=["decode", "train-p0"])
def test_cuda_reduce_overhead_graphs_the_lora_layers_without_dropout(train):
    """Issue 11 item 5: torch.compile(mode="reduce-overhead") of a LoRA model on the Triton
    backend without dropout (eval decode; a p = 0 training step) runs under CUDA graphs —
    Inductor skips none (the scalars are built in the graph from the ScalarDicts' device
    mirrors, no host op) —, gives eager's numbers, and a new scaling reaches the replayed
    graph (the mirror is filled in place) without a recompile."""
    from torch._dynamo.utils import counters

    counters.clear()
    model = tiny_lora_model(backend="triton", device="cuda").train(train)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)

    def check(step: int) -> None:
        x = torch.randn(4, 33, K, device="cuda")
        if train:
            out_c, grads_c = train_step(compiled, x, seed=step)
            out_e, grads_e = train_step(eager, x, seed=step)
            for name, g in grads_e.items():
                assert_close(grads_c[name], g, RTOL[torch.float32], name)
        else:
            with torch.no_grad():
                out_c, out_e = compiled(x).clone(), eager(x)
        assert_close(out_c, out_e, RTOL[torch.float32], "out")

    for step in range(3):  # warm-up, record, replay
        check(step)
    graphs = counters["stats"]["unique_graphs"]
    for m in (model, eager):
        for layer in lora_layers(m):
            layer.scaling["default"] = 0.25
    check(3)
    check(4)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["stats"]["unique_graphs"] == graphs, "a new scaling recompiled"


def test_hf_llama_with_lora_compiles_fullgraph():
    """A tiny transformers Llama (random weights, built from a config) with every linear
    injected, dropout on: one graph, no break, compiled loss and grads equal eager's."""
    transformers = pytest.importorskip("transformers")
    import lorakern

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(config)
    lorakern.inject(model, lorakern.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                               target_modules="all-linear", init_lora_weights=False))
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    results = []
    for fn in (compiled, model):
        torch.manual_seed(3)
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((loss.detach(), grads))
    (loss_c, grads_c), (loss_e, grads_e) = results
    assert counter.frame_count == 1
    assert_close(loss_c, loss_e, RTOL[torch.float32], "loss")
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == 2 * 7 * 2  # 2 layers × 7 linears × (A, B)
    for name in grads_e:
        assert_close(grads_c[name], grads_e[name], RTOL[torch.float32], name)
