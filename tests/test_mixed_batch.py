"""Mixed batches (lorakern/mixed.py): each batch row through its own adapter.

- `lorakern.mixed_batch(model, names)` gives PEFT's mixed-batch logits
  (`peft_model(..., adapter_names=names)`) on tiny Llama / GPT-2 / BERT models with
  adapters of different ranks, scalings (rsLoRA), targets and modules_to_save copies;
- gradients match a row-by-row computation (plain PyTorch at the layer level, the
  single-adapter path at the model level), fp64; adapters no row uses get none;
- greedy generate keeps each row's adapter;
- bad names, wrong lengths, merged adapters and DoRA raise before anything runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakern
from lorakern.model import lora_layers
from tests.conftest import requires_triton
from tests.test_model_helpers import input_ids
from tests.utils import RTOL, assert_close

pytestmark = pytest.mark.usefixtures("quiet_warnings")

TOL = RTOL[torch.float32]
TOL64 = RTOL[torch.float64]
PREFIX = "base_model.model."
BASE = "__base__"
NAMES = ("one", "two", "tri")  # not "a", "b": PEFT warns about names inside "lora_"


# ---------------------------------------------------------------------------- layer level


def _ref_mixed(x, W, bias, As, Bs, scalings, rows):
    """Plain PyTorch, one row at a time."""
    out = []
    for b, i in enumerate(rows):
        y = x[b] @ W.t()
        if bias is not None:
            y = y + bias
        if i >= 0:
            y = y + scalings[i] * ((x[b] @ As[i].t()) @ Bs[i].t())
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(5, 16), (7, 3, 16), (1, 2, 16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_functional_matches_reference_with_grads(shape, with_bias):
    torch.manual_seed(0)
    K, N = shape[-1], 12
    ranks, scalings = [1, 3, 4], [2.0, 0.5, 1.0 / 4**0.5]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(N, dtype=torch.float64, requires_grad=True) if with_bias else None
    As = [torch.randn(r, K, dtype=torch.float64, requires_grad=True) for r in ranks]
    Bs = [torch.randn(N, r, dtype=torch.float64, requires_grad=True) for r in ranks]
    B = shape[0]
    rows = [[2, -1, 0, 2, 1, 0, -1][b] for b in range(B)]  # interleaved, base rows, unsorted
    y = lorakern.lora_linear_mixed(x, W, bias, As, Bs, scalings, torch.tensor(rows))
    ref = _ref_mixed(x, W, bias, As, Bs, scalings, rows)
    assert_close(y, ref, TOL64, "y")
    g = torch.randn_like(ref)
    params = [x, W, *([bias] if with_bias else []), *As, *Bs]
    used = [p.requires_grad for p in params]
    grads = torch.autograd.grad((y * g).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for i, (gr, rg) in enumerate(zip(grads, ref_grads)):
        assert used[i]
        if rg is None:  # an adapter no row uses
            assert gr is None, f"param {i} got a gradient though no row uses it"
        else:
            assert_close(gr, rg, TOL64, f"grad {i}")


def test_functional_lora_term_alone_and_all_base():
    torch.manual_seed(1)
    x, W = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    As, Bs = [torch.randn(2, 8, dtype=torch.float64)], [torch.randn(6, 2, dtype=torch.float64)]
    y = lorakern.lora_linear_mixed(x, None, None, As, Bs, [0.5], [0, -1, 0])
    ref = _ref_mixed(x, W, None, As, Bs, [0.5], [0, -1, 0]) - x @ W.t()
    assert_close(y, ref, TOL64)
    assert torch.equal(lorakern.lora_linear_mixed(x, W, None, As, Bs, [0.5], [-1, -1, -1]), x @ W.t())


def test_functional_bad_row_adapter():
    x, W = torch.randn(3, 8), torch.randn(6, 8)
    As, Bs = [torch.randn(2, 8)], [torch.randn(6, 2)]
    with pytest.raises(ValueError, match=r"in \[-1, 1\)"):
        lorakern.lora_linear_mixed(x, W, None, As, Bs, [1.0], [0, 1, -1])
    with pytest.raises(ValueError, match="3 rows"):
        lorakern.lora_linear_mixed(x, W, None, As, Bs, [1.0], [0, 0])
    with pytest.raises(TypeError, match="integer"):
        lorakern.lora_linear_mixed(x, W, None, As, Bs, [1.0], torch.zeros(3))
    with pytest.raises(ValueError, match="one entry per adapter"):
        lorakern.lora_linear_mixed(x, W, None, As, Bs, [1.0, 2.0], [0, 0, 0])


def _layer(dtype=torch.float64, dropout=0.0):
    torch.manual_seed(2)
    layer = lorakern.LoraLinear(nn.Linear(16, 12, dtype=dtype), r=4, lora_alpha=8, adapter_name="a",
                                init_lora_weights=False, lora_dropout=dropout)
    layer.update_layer("b", 1, 3, lora_dropout=dropout, init_lora_weights=False)
    layer.update_layer("c", 2, 5, use_rslora=True, lora_dropout=dropout, init_lora_weights=False)
    for name in layer.lora_A:
        layer.lora_A[name].weight.requires_grad_(True)
        layer.lora_B[name].weight.requires_grad_(True)
    return layer


def test_layer_forward_adapter_names_matches_single_adapter_rows():
    layer = _layer()
    names = ["b", BASE, "a", "b", "c"]
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    y = layer(x, adapter_names=names)
    for row, name in enumerate(names):
        if name == BASE:
            ref = layer.base_layer(x[row:row + 1])
        else:
            layer.set_adapter(name)
            ref = layer(x[row:row + 1])
        assert_close(y[row:row + 1], ref, TOL64, f"row {row} ({name})")


def test_inference_skips_the_op_with_the_same_numbers(monkeypatch):
    """Without autograd the reference path calls the reference functions directly (no op
    dispatch per adapter): bit-identical to the op, and the op's input checks still run."""
    layer = _layer(torch.float32)
    names = ["b", BASE, "a", "b", "c", "a"]
    x = torch.randn(6, 3, 16)
    y_grad = layer(x, adapter_names=names)
    calls = []
    monkeypatch.setattr(lorakern.mixed, "lora_linear", lambda *a, **k: calls.append(1) or lorakern.lora_linear(*a, **k))
    with torch.no_grad():
        y_fast = layer(x, adapter_names=names)
    assert calls == [] and torch.equal(y_fast, y_grad)
    layer(x, adapter_names=names).sum().backward()  # with autograd: through the op
    assert len(calls) == 3
    with torch.no_grad(), pytest.raises(ValueError, match="lora_A"):
        lorakern.lora_linear_mixed(x, layer.base_layer.weight, None, [torch.randn(2, 15)], [torch.randn(12, 2)], [1.0],
                                   [0, -1, 0, 0, 0, 0])


def test_layer_strict_names_and_lengths():
    layer = _layer()
    x = torch.randn(3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no adapter named \['zz'\].*'a', 'b', 'c'"):
        layer(x, adapter_names=["a", "zz", BASE])
    with pytest.raises(ValueError, match="2 adapter names for a batch of 3 rows"):
        layer(x, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="list of str"):
        layer(x, adapter_names="a")
    layer.merge(["a"])
    with pytest.raises(ValueError, match="merged"):
        layer(x, adapter_names=["a", "b", BASE])


def test_layer_dropout_in_training():
    layer = _layer(dropout=0.5).train()
    x = torch.randn(4, 16, dtype=torch.float64)
    names = ["a", BASE, "b", "a"]
    torch.manual_seed(5)
    y1 = layer(x, adapter_names=names)
    torch.manual_seed(5)
    y2 = layer(x, adapter_names=names)
    assert torch.equal(y1, y2)  # seeded by torch's generator, as the single-adapter path
    assert_close(y1[1], layer.base_layer(x)[1], TOL64, "base row")  # no LoRA term, no dropout
    y_eval = layer.eval()(x, adapter_names=names)
    assert not torch.allclose(y1[0], y_eval[0])  # dropout is on for adapter rows
    # a batch of one adapter: the same mask as the single-adapter path
    layer.train().set_adapter("a")
    torch.manual_seed(6)
    single = layer(x)
    torch.manual_seed(6)
    assert torch.equal(layer(x, adapter_names=["a"] * 4), single)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_quantized_and_autocast_rows_match_single_adapter_path(quantize, autocast):
    """Each row as the single-adapter path gives it, to the rounding of the half-precision
    compute dtype (the mixed path adds the base and the LoRA term in it: one more rounding)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    if quantize:
        lorakern.quantize(model)
    lorakern.inject(model, lorakern.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False), adapter_name="p")
    lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), adapter_name="q")
    x = torch.randn(4, 64)
    names = ["q", BASE, "p", "q"]
    tol = RTOL[torch.bfloat16] if quantize or autocast else TOL
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with lorakern.mixed_batch(model, names):
            y = model(x)
        for row, name in enumerate(names):
            if name == BASE:
                with lorakern.disable_adapters(model):
                    ref = model(x)[row]
            else:
                lorakern.set_adapter(model, name)
                ref = model(x)[row]
            assert_close(y[row], ref, tol, f"row {row} ({name})")
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)


# ---------------------------------------------------------------------------- vs PEFT


peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(77)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


CASES = {
    "llama": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
        dict(r=1, lora_alpha=2, target_modules=["v_proj"]),
    ),
    "gpt2": (
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        dict(r=1, lora_alpha=1, target_modules=["c_fc"], fan_in_fan_out=True),
    ),
    "bert": (
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
        dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["key", "dense"], modules_to_save=["classifier"]),
        dict(r=1, lora_alpha=2, target_modules=["value"], modules_to_save=["classifier"]),
    ),
}


def _base(case, request):
    return tiny_bert() if case == "bert" else request.getfixturevalue(case)


def _both(base, configs):
    """The same three adapters ("one", "two", "tri", random weights) in PEFT and in lorakern."""
    kws = [dict(kw, init_lora_weights=False) for kw in configs]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kws[0]), adapter_name="one")
    for name, kw in zip(("two", "tri"), kws[1:]):
        pm.add_adapter(name, peft.LoraConfig(**kw))
    with torch.no_grad():  # modules_to_save copies that differ from the original
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    pm.eval()
    model = copy.deepcopy(base)
    for name, kw in zip(NAMES, kws):
        lorakern.inject(model, lorakern.LoraConfig(**kw), adapter_name=name)
    sd = {n.removeprefix(PREFIX): p for n, p in pm.state_dict().items()}
    assert sd.keys() == model.state_dict().keys()
    model.load_state_dict(sd)
    return pm, model.eval()


def _out(out):
    return out.logits


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("case", ["llama", "gpt2", "bert"])
def test_mixed_batch_matches_peft(case, backend, request):
    """Both paths: the per-adapter loop (reference) and the SGMV kernels (Triton; in the
    interpreter on CPU)."""
    pm, model = _both(_base(case, request), CASES[case])
    for _, layer in lora_layers(model):
        layer.backend = backend
    ids = input_ids(batch=7, seq=6, seed=3)
    names = ["two", "one", BASE, "tri", "one", "two", BASE]  # odd count, interleaved, "tri" only in some layers
    with torch.no_grad():
        theirs = _out(pm(input_ids=ids, adapter_names=names))
        with lorakern.mixed_batch(model, names):
            ours = _out(model(input_ids=ids))
        plain = _out(model(input_ids=ids))  # after the block: the active adapter again
    assert_close(ours, theirs, TOL, f"{case} mixed-batch logits")
    assert not torch.allclose(ours[0], ours[1])  # the adapters do differ
    with torch.no_grad():
        assert_close(plain, _out(pm(input_ids=ids)), TOL, "after the block")
    assert all("_mixed_adapter_names" not in layer.__dict__ for _, layer in lora_layers(model))


def test_mixed_batch_gradients_match_rows_through_single_adapter_path(llama):
    torch.manual_seed(9)
    model = copy.deepcopy(llama).double()
    for name, kw in zip(NAMES, CASES["llama"]):
        lorakern.inject(model, lorakern.LoraConfig(**kw, init_lora_weights=False), adapter_name=name)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in lora.values():
        p.requires_grad_(True)
    ids = input_ids(batch=5, seq=4, seed=4)
    names = ["one", BASE, "two", "one", BASE]  # "tri" used by no row
    g = torch.randn(5, 4, 128, dtype=torch.float64)

    with lorakern.mixed_batch(model, names):
        (model(input_ids=ids).logits * g).sum().backward()
    ours = {n: p.grad for n, p in lora.items()}
    for p in lora.values():
        p.grad = None
    for row, name in enumerate(names):
        if name == BASE:
            continue  # no adapter parameter gets a gradient from a base row
        lorakern.set_adapter(model, name)
        (model(input_ids=ids[row:row + 1]).logits * g[row:row + 1]).sum().backward()
    for n, p in lora.items():
        if ".tri." in n or p.grad is None:
            assert ours[n] is None, f"{n}: got a gradient though no row uses it"
        else:
            assert_close(ours[n], p.grad, TOL64, n)
    assert sum(ours[n] is not None for n in lora) > 0


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_generate_keeps_each_rows_adapter(case, request):
    pm, model = _both(request.getfixturevalue(case), CASES[case])
    ids = input_ids(batch=3, seq=5, seed=8)
    names = ["two", BASE, "one"]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with lorakern.mixed_batch(model, names):
            ours = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        theirs = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
        for row, name in enumerate(names):
            one = ids[row:row + 1]
            if name == BASE:
                with lorakern.disable_adapters(model):
                    ref = model.generate(one, attention_mask=torch.ones_like(one), **kw)
            else:
                lorakern.set_adapter(model, name)
                ref = model.generate(one, attention_mask=torch.ones_like(one), **kw)
            assert torch.equal(ours[row:row + 1], ref), f"row {row} ({name})"
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_beam_search_repeats_each_name_for_its_beams_as_peft(case, request):
    pm, model = _both(request.getfixturevalue(case), CASES[case])
    ids = input_ids(batch=3, seq=5, seed=11)
    names = ["two", BASE, "one"]
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        with lorakern.mixed_batch(model, names, num_beams=2):
            ours = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        theirs = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
        lorakern.set_adapter(model, "one")
        alone = model.generate(ids[2:], attention_mask=torch.ones_like(ids[2:]), **kw)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[2:], alone)
    # without num_beams the expanded batch is refused, naming the fix
    with lorakern.mixed_batch(model, names), pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def test_num_beams_is_validated(llama):
    _, model = _both(llama, CASES["llama"])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_beams"):
            with lorakern.mixed_batch(model, ["one"], num_beams=bad):
                pass


# ---------------------------------------------------------------------------- errors


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bad_names_raise_before_anything_runs(llama):
    _, model = _both(llama, CASES["llama"])
    ids = input_ids(batch=3, seq=4)
    before = _snapshot(model)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with pytest.raises(ValueError, match=r"no adapter named \['typo'\]; the model has \['one', 'two', 'tri'\]"):
        with lorakern.mixed_batch(model, ["one", "typo", BASE]):
            pytest.fail("entered the block")
    with pytest.raises(TypeError, match="list of str"):
        with lorakern.mixed_batch(model, "one"):
            pass
    with pytest.raises(ValueError, match="empty"):
        with lorakern.mixed_batch(model, []):
            pass
    with pytest.raises(ValueError, match="2 adapter names for a batch of 3 rows"):
        with lorakern.mixed_batch(model, ["one", "two"]):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="has no lorakern adapters"):
        with lorakern.mixed_batch(nn.Linear(2, 2), ["one"]):
            pass
    lorakern.merge(model, ["one"])
    merged = _snapshot(model)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        with lorakern.mixed_batch(model, ["one", "two", BASE]):
            pytest.fail("entered the block")
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[k]), k
    lorakern.unmerge(model)
    assert all("_mixed_adapter_names" not in layer.__dict__ for _, layer in lora_layers(model))
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, ref, TOL, "model unchanged")
    for k, v in model.state_dict().items():
        assert_close(v, before[k], TOL, k)


def test_dora_refused(llama):
    model = copy.deepcopy(llama)
    lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True), adapter_name="d")
    with pytest.raises(NotImplementedError, match="DoRA"):
        with lorakern.mixed_batch(model, ["a", "d"]):
            pass
    with lorakern.mixed_batch(model, ["a", BASE]):  # DoRA adapters present but unused: fine
        model(input_ids=input_ids(batch=2, seq=3))


def test_exception_inside_block_restores_model():
    torch.manual_seed(3)
    model = lorakern.inject(nn.Sequential(nn.Linear(8, 8)), lorakern.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(2, 8)
    ref = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with lorakern.mixed_batch(model, [BASE, BASE]):
            assert torch.equal(model(x), model[0].base_layer(x))
            raise RuntimeError("boom")
    assert torch.equal(model(x), ref)


# ---------------------------------------------------------------------------- torch.compile


def test_compiled_mixed_batches_do_not_recompile_when_the_names_change(llama):
    """Under torch.compile the row -> adapter map is a tensor (no guard on the names): new
    batch compositions, "__base__" rows and a hot-swapped weight reuse one graph; the
    logits are the eager mixed batch's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    _, model = _both(llama, CASES["llama"])
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = input_ids(batch=4, seq=5, seed=12)
    lists = (["one", "two", BASE, "tri"], ["tri", "tri", "one", BASE], [BASE] * 4, ["two"] * 4)
    with torch.no_grad():
        for names in lists:
            with lorakern.mixed_batch(model, names):
                ours = compiled(input_ids=ids).logits
                eager = model(input_ids=ids).logits
            assert_close(ours, eager, TOL, f"{names}")
        layer = next(layer for _, layer in lora_layers(model) if "one" in layer.lora_A)
        layer.lora_B["one"].weight.mul_(3.0)  # a hot-swap writes in place
        with lorakern.mixed_batch(model, lists[0]):
            assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, TOL, "after the swap")
    assert counter.frame_count == 1


def test_compiled_mixed_batch_with_lora_bias_and_beams_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    lorakern.inject(model, lorakern.LoraConfig(r=3, target_modules=["0", "2"], lora_bias=True, init_lora_weights=False),
                    adapter_name="p")
    lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), adapter_name="q")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    model.eval()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    names = ["q", "p", BASE]
    with torch.no_grad(), lorakern.mixed_batch(model, names, num_beams=2):
        for rows in (3, 6):  # the inputs, then the beam-expanded batch
            x = torch.randn(rows, 16)
            assert_close(compiled(x), model(x), TOL, f"{rows} rows")
    assert counter.frame_count <= 2  # one graph per batch size at most
