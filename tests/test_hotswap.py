"""Hot-swapping adapters in place (lorakern.hotswap_adapter) and preparing a model for it
(lorakern.prepare_model_for_compiled_hotswap), PEFT's semantics.

Oracles: the same adapter loaded normally (lorakern.load_adapter into a fresh model, and
PEFT's PeftModel.from_pretrained); the model before a failed swap, bit for bit; and
torch._dynamo's compile counter (a hot-swap must not recompile).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import lorakern
from lorakern import hotswap
from lorakern.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError
from lorakern.model import adapter_configs, lora_layers
from tests.test_model_helpers import assert_same_state, full_state, input_ids, logits
from tests.utils import RTOL, assert_close

TOL = RTOL[torch.float32]
FIELDS = ("r", "lora_alpha", "use_rslora", "lora_dropout", "scaling")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 4)).eval()


def save(tmp_path, name: str, seed: int, base=mlp, **kwargs):
    """Save a random (nonzero) lorakern adapter made from LoraConfig(**kwargs); return (dir, model)."""
    kwargs.setdefault("target_modules", ["0", "2", "4"])
    torch.manual_seed(seed)
    model = lorakern.inject(base(), lorakern.LoraConfig(init_lora_weights=False, **kwargs))
    model.eval()
    path = tmp_path / name
    lorakern.save_adapter(model, path)
    return path, model


def layer_fields(model, adapter_name="default"):
    return {n: tuple(getattr(layer, f)[adapter_name] for f in FIELDS) for n, layer in lora_layers(model)}


def params(model):
    return {n: (p, p.data_ptr()) for n, p in model.named_parameters()}


def assert_same_params(model, before):
    after = params(model)
    assert after.keys() == before.keys()
    for n, (p, ptr) in before.items():
        assert after[n][0] is p, f"{n}: a new Parameter object"
        assert after[n][1] == ptr, f"{n}: new storage"


# ----------------------------------------------------------------------------- eager semantics


def test_same_rank_swap_equals_a_fresh_load_and_keeps_parameters(tmp_path):
    """Same rank, other alpha / rslora / dropout: the swapped model is bit-identical to one
    that loaded the file normally (outputs, state, r / alpha / scaling per layer, stored
    config), and every parameter is the same object on the same storage."""
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8)
    b, _ = save(tmp_path, "b", 2, r=4, lora_alpha=3, use_rslora=True, lora_dropout=0.1)
    model = lorakern.load_adapter(mlp(), a)
    x = torch.randn(7, 16)
    out_a = model(x)
    before = params(model)
    lorakern.hotswap_adapter(model, b, torch_device="cpu")
    fresh = lorakern.load_adapter(mlp(), b)
    assert torch.equal(model(x), fresh(x))
    assert not torch.allclose(model(x), out_a)
    assert_same_params(model, before)
    assert_same_state(model, full_state(fresh))
    assert layer_fields(model) == layer_fields(fresh)
    assert layer_fields(model)["0"][-1] == 3 / math.sqrt(4)
    assert adapter_configs(model) == adapter_configs(fresh)


def test_scaling_mirrors_are_updated_in_place(tmp_path):
    """The compiled graph reads each ScalarDict's tensor mirror: it must be the same tensor,
    holding the new scaling."""
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8)
    b, _ = save(tmp_path, "b", 2, r=4, lora_alpha=2)
    model = lorakern.load_adapter(mlp(), a)
    mirrors = {n: layer.scaling.tensor("default") for n, layer in lora_layers(model)}
    lorakern.hotswap_adapter(model, b)
    for n, layer in lora_layers(model):
        assert layer.scaling.tensor("default") is mirrors[n]
        assert mirrors[n].item() == 0.5 == layer.scaling["default"]


def test_smaller_rank_is_zero_padded_with_its_own_scaling(tmp_path):
    """A rank-2 file into rank-8 storage (no prepare: the first adapter had rank 8): A's
    first rows / B's first columns hold the file, the rest zeros, scaling alpha / 2 (what a
    normal load gives), outputs equal a fresh load."""
    a, _ = save(tmp_path, "a", 1, r=8, lora_alpha=16)
    b, ref = save(tmp_path, "b", 2, r=2, lora_alpha=5)
    model = lorakern.load_adapter(mlp(), a)
    before = params(model)
    lorakern.hotswap_adapter(model, b)
    assert_same_params(model, before)
    fresh = lorakern.load_adapter(mlp(), b)
    x = torch.randn(5, 16)
    assert_close(model(x), fresh(x), TOL)
    for (n, layer), (_, want) in zip(lora_layers(model), lora_layers(ref)):
        A, B = layer.lora_weights("default")
        A0, B0 = want.lora_weights("default")
        assert A.shape[0] == 8 and B.shape[1] == 8
        assert torch.equal(A[:2], A0) and torch.equal(B[:, :2], B0), n
        assert not A[2:].any() and not B[:, 2:].any(), n
        assert layer.r["default"] == 2 and layer.scaling["default"] == 2.5


def test_peft_saved_adapters_on_llama_match_peft(llama, tmp_path):
    """Tiny Llama, adapters saved by PEFT (rank / alpha patterns, rsLoRA, different ranks):
    load the first with lorakern, prepare to the largest rank, hot-swap the others in;
    the logits equal PEFT's PeftModel.from_pretrained of each and lorakern's own load,
    and the scalings are PEFT's."""
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]
    kinds = [
        dict(r=4, lora_alpha=8, target_modules=targets),
        dict(r=8, lora_alpha=5, target_modules=targets, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 12}),
        dict(r=2, lora_alpha=3, use_rslora=True, target_modules=targets),
    ]
    dirs = []
    for i, kw in enumerate(kinds):
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(init_lora_weights=False, **kw))
        pm.save_pretrained(tmp_path / str(i))
        dirs.append(tmp_path / str(i))
    ids = input_ids()
    model = lorakern.load_adapter(copy.deepcopy(llama), dirs[0])
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=8)
    before = params(model)
    for d in dirs[1:] + dirs[:1]:
        lorakern.hotswap_adapter(model, d)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(llama), d)
        assert_close(logits(model, ids), logits(pm, ids), TOL, f"logits vs PEFT ({d.name})")
        fresh = lorakern.load_adapter(copy.deepcopy(llama), d)
        assert_close(logits(model, ids), logits(fresh, ids), TOL, f"logits vs lorakern ({d.name})")
        theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
        for n, layer in lora_layers(model):
            assert layer.r["default"] == theirs[n].r["default"], n
            assert layer.scaling["default"] == pytest.approx(theirs[n].scaling["default"], rel=1e-12), n
    assert_same_params(model, before)


def test_dora_modules_to_save_and_bias_all_are_swapped(tmp_path):
    """DoRA magnitudes, modules_to_save copies and bias="all" biases are written in place
    too; the result equals a fresh load."""
    kw = dict(target_modules=["0", "2"], modules_to_save=["4"], bias="all", use_dora=True)
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8, **kw)
    b, _ = save(tmp_path, "b", 2, r=4, lora_alpha=6, **kw)
    # Make the second adapter's biases and saved copy differ from the first's.
    _, tensors = lorakern.adapters.read_adapter(b)
    from safetensors.torch import save_file

    torch.manual_seed(3)
    save_file({k: v + torch.randn_like(v) if ("bias" in k or ".4." in k or "magnitude" in k) else v
               for k, v in tensors.items()}, str(b / WEIGHTS_NAME), metadata={"format": "pt"})
    model = lorakern.load_adapter(mlp(), a)
    before = params(model)
    lorakern.hotswap_adapter(model, b)
    fresh = lorakern.load_adapter(mlp(), b)
    x = torch.randn(6, 16)
    assert torch.equal(model(x), fresh(x))
    assert_same_state(model, full_state(fresh))
    assert_same_params(model, before)


def _embed_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 3 * 8 * 8), nn.Unflatten(-1, (3, 8, 8)), nn.Conv2d(3, 4, 3)).eval()


def test_embedding_and_conv_layers_swap_and_pad(tmp_path):
    """LoraEmbedding and LoraConv2d: prepared (padded), then a smaller-rank swap; equal to a
    fresh load, same parameters."""
    kw = dict(base=_embed_conv, target_modules=["0", "2"])
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8, **kw)
    b, _ = save(tmp_path, "b", 2, r=2, lora_alpha=3, **kw)
    ids = torch.randint(0, 20, (5,))
    model = lorakern.load_adapter(_embed_conv(), a)
    out_a = model(ids)
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=6)
    assert_close(model(ids), out_a, TOL, "padded")
    before = params(model)
    lorakern.hotswap_adapter(model, b)
    assert_same_params(model, before)
    assert all(layer.lora_weights("default")[0].shape[0] == 6 for _, layer in lora_layers(model))
    assert_close(model(ids), lorakern.load_adapter(_embed_conv(), b)(ids), TOL, "swapped")


def test_compiled_wrapper_is_accepted(tmp_path):
    """hotswap_adapter takes torch.compile's wrapper (as PEFT does) and swaps the module behind it."""
    a, _ = save(tmp_path, "a", 1, r=4)
    b, _ = save(tmp_path, "b", 2, r=4)
    model = lorakern.load_adapter(mlp(), a)
    lorakern.hotswap_adapter(torch.compile(model), b)
    x = torch.randn(3, 16)
    assert torch.equal(model(x), lorakern.load_adapter(mlp(), b)(x))


def test_eager_mixed_batch_stack_cache_sees_the_swap(tmp_path):
    """Eager mixed batches on the Triton backend cache each layer's stacked adapters, keyed
    on the parameters' version counters: the in-place swap must invalidate it."""
    if not lorakern.ops.interpreting() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    a, _ = save(tmp_path, "a", 1, r=4)
    b, _ = save(tmp_path, "b", 2, r=4, lora_alpha=8)
    c, _ = save(tmp_path, "c", 3, r=2, lora_alpha=4)  # a's scaling (8 / 4): only the weights change
    model = lorakern.load_adapter(mlp(), a)
    lorakern.load_adapter(model, b, adapter_name="other")
    for _, layer in lora_layers(model):
        layer.backend = "triton"
    x = torch.randn(4, 16)
    names = ["default", "__base__", "other", "default"]
    with torch.no_grad():
        with lorakern.mixed_batch(model, names):
            model(x)
        assert all("_sgmv_stacks" in layer.__dict__ for _, layer in lora_layers(model)), "the fused path did not run"
        lorakern.hotswap_adapter(model, c)
        with lorakern.mixed_batch(model, names):
            y = model(x)
    fresh = lorakern.load_adapter(mlp(), c)
    assert_close(y[[0, 3]], fresh(x[[0, 3]]), TOL, "rows of the swapped adapter")


# ----------------------------------------------------------------------------- prepare


def test_prepare_pads_every_adapter_and_keeps_outputs(tmp_path):
    """Every adapter of every layer padded with zeros to target_rank, same Parameter objects
    (grads padded too), r / alpha / scaling unchanged, outputs equal."""
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8)
    b, _ = save(tmp_path, "b", 2, r=2, lora_alpha=3, target_modules=["2"])
    model = lorakern.load_adapter(mlp(), a, is_trainable=True)
    lorakern.load_adapter(model, b, adapter_name="other")
    lorakern.set_adapter(model, ["default", "other"])
    x = torch.randn(9, 16)
    model(x).square().sum().backward()
    out = model(x).detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    fields = layer_fields(model, "default")
    before = params(model)
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=6)
    for n, (p, _) in before.items():
        assert dict(model.named_parameters())[n] is p, n
    for n, layer in lora_layers(model):
        for name in layer.held_adapters():
            A, B = layer.lora_weights(name)
            assert A.shape[0] == 6 and B.shape[1] == 6, (n, name)
            r = layer.r[name]
            assert not A[r:].any() and not B[:, r:].any()
            assert layer.lora_A[name].out_features == 6 == layer.lora_B[name].in_features
    assert layer_fields(model, "default") == fields
    assert_close(model(x), out, TOL)
    for n, p in model.named_parameters():
        if n in grads:
            g = grads[n]
            sl = tuple(slice(0, s) for s in g.shape)
            assert torch.equal(p.grad[sl], g) and p.grad.shape == p.shape, n
    # Training steps after padding keep the pads at zero (their gradients are zero).
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    for _, layer in lora_layers(model):
        A, B = layer.lora_weights("default")
        assert not A[4:].any() and not B[:, 4:].any()


def test_prepare_updates_a_given_config_and_refuses_what_it_cannot_do(tmp_path):
    a, _ = save(tmp_path, "a", 1, r=4, rank_pattern={"2": 6})
    model = lorakern.load_adapter(mlp(), a)
    state = full_state(model)
    with pytest.raises(ValueError, match="larger ranks are stored"):
        lorakern.prepare_model_for_compiled_hotswap(model, target_rank=5)  # layer "2" has rank 6
    assert_same_state(model, state)
    with pytest.raises(ValueError, match="target_rank"):
        lorakern.prepare_model_for_compiled_hotswap(model, target_rank=0)
    with pytest.raises(ValueError, match="check_compiled"):
        lorakern.prepare_model_for_compiled_hotswap(model, check_compiled="maybe")
    with pytest.raises(ValueError, match="no LoRA layers"):
        lorakern.prepare_model_for_compiled_hotswap(mlp())
    compiled = torch.compile(model)
    with pytest.raises(ValueError, match="before compiling"):
        lorakern.prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    in_place = copy.deepcopy(model)
    in_place.compile()  # nn.Module.compile: compiled in place, no wrapper
    with pytest.raises(ValueError, match="before compiling"):
        lorakern.prepare_model_for_compiled_hotswap(in_place, target_rank=8)
    assert_same_state(model, state)
    cfg = lorakern.LoraConfig(r=4, rank_pattern={"2": 6}, target_modules=["0"])
    with pytest.warns(UserWarning, match="already compiled"):
        lorakern.prepare_model_for_compiled_hotswap(compiled, target_rank=8, config={"x": cfg}, check_compiled="warn")
    assert cfg.r == 8 and cfg.rank_pattern == {"2": 8}
    assert all(layer.lora_weights("default")[0].shape[0] == 8 for _, layer in lora_layers(model))


# ----------------------------------------------------------------------------- failures


def _edit_config(path, **changes):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


def _edit_weights(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})  # no lorakern record: no mix check


def _first_key(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


FAILURES = {
    "other targets": (lambda tmp: save(tmp, "f", 5, r=4, target_modules=["0", "2"])[0], "different modules"),
    "rank above storage": (lambda tmp: save(tmp, "f", 5, r=6)[0], "model stores rank 4"),
    "use_dora": (lambda tmp: save(tmp, "f", 5, r=4, use_dora=True)[0], "use_dora"),
    "lora_bias": (lambda tmp: save(tmp, "f", 5, r=4, lora_bias=True)[0], "lora_bias"),
    "bias mode": (lambda tmp: save(tmp, "f", 5, r=4, bias="all")[0], "bias"),
    "fan_in_fan_out": (lambda tmp: _config(tmp, fan_in_fan_out=True, record=False), "fan_in_fan_out"),
    "modules_to_save": (lambda tmp: save(tmp, "f", 5, r=4, modules_to_save=["3"])[0], "different modules"),
    "missing key": (lambda tmp: _weights(tmp, lambda t: t.pop(_first_key(t, "4.lora_B"))), "missing keys"),
    "NaN value": (lambda tmp: _weights(tmp, lambda t: t[_first_key(t, "2.lora_A")].__setitem__((0, 0), float("nan"))),
                  "non-finite"),
    "wrong shape": (lambda tmp: _weights(tmp, lambda t: t.__setitem__(_first_key(t, "2.lora_A"), torch.randn(4, 5))),
                    "shape"),
    "mixed saves": (lambda tmp: _config(tmp, lora_alpha=99), "mix of two saves"),
    "no file": (lambda tmp: tmp / "nothing-here", "does not exist"),
}


def _weights(tmp, edit):
    path, _ = save(tmp, "f", 5, r=4)
    _edit_weights(path, edit)
    return path


def _config(tmp, record=True, **changes):
    """A saved adapter with its config edited; record=False also drops the weights' record
    of the config (as a PEFT-written file has none), so the edit is not refused as a mix."""
    path, _ = save(tmp, "f", 5, r=4)
    _edit_config(path, **changes)
    if not record:
        _edit_weights(path, lambda t: None)
    return path


@pytest.mark.parametrize("case", list(FAILURES))
def test_failed_swap_leaves_the_model_unchanged(case, tmp_path):
    make, message = FAILURES[case]
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8)
    model = lorakern.load_adapter(mlp(), a)
    bad = make(tmp_path)
    state, fields, configs = full_state(model), layer_fields(model), copy.deepcopy(adapter_configs(model))
    with pytest.raises((AdapterLoadError, FileNotFoundError), match=message):
        lorakern.hotswap_adapter(model, bad)
    assert_same_state(model, state)
    assert layer_fields(model) == fields
    assert adapter_configs(model) == configs


def test_unknown_or_merged_adapter_is_refused(tmp_path):
    a, _ = save(tmp_path, "a", 1, r=4)
    b, _ = save(tmp_path, "b", 2, r=4)
    model = lorakern.load_adapter(mlp(), a)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        lorakern.hotswap_adapter(model, b, "nope")
    lorakern.merge(model)
    state = full_state(model)
    with pytest.raises(ValueError, match="merged"):
        lorakern.hotswap_adapter(model, b)
    assert_same_state(model, state)


def test_interrupt_while_writing_restores_everything(tmp_path, monkeypatch):
    """An error after some values were written (here: a KeyboardInterrupt right after the
    writes) puts back every value and every layer field."""
    a, _ = save(tmp_path, "a", 1, r=8, lora_alpha=8)
    b, _ = save(tmp_path, "b", 2, r=2, lora_alpha=3)
    model = lorakern.load_adapter(mlp(), a)
    state, fields = full_state(model), layer_fields(model)
    real = hotswap._write_values

    def write_then_stop(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(hotswap, "_write_values", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lorakern.hotswap_adapter(model, b)
    assert_same_state(model, state)
    assert layer_fields(model) == fields


# ----------------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_hotswaps_never_recompile(tmp_path, fresh_dynamo):
    """fullgraph aot_eager: hot-swap five adapters of the same and of smaller ranks (other
    alphas, rsLoRA) into a prepared model: one compiled frame throughout, and each output
    equals the eager model that loaded that adapter normally."""
    kinds = [dict(r=8, lora_alpha=16), dict(r=8, lora_alpha=5), dict(r=4, lora_alpha=3),
             dict(r=2, lora_alpha=7, use_rslora=True), dict(r=1, lora_alpha=2),
             dict(r=6, lora_alpha=6, rank_pattern={"4": 3})]
    dirs = [save(tmp_path, str(i), 20 + i, **kw)[0] for i, kw in enumerate(kinds)]
    model = lorakern.load_adapter(mlp(), dirs[2])  # rank 4 first: prepare pads it to 8
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(5, 16)
    outputs = []
    with torch.no_grad():
        for d in dirs:
            lorakern.hotswap_adapter(compiled, d)
            out = compiled(x)
            assert_close(out, lorakern.load_adapter(mlp(), d)(x), TOL, f"adapter {d.name}")
            outputs.append(out)
    assert counter.frame_count == 1, f"{counter.frame_count} compiled frames: a hot-swap recompiled"
    assert all(not torch.allclose(outputs[i], outputs[i + 1]) for i in range(len(outputs) - 1))


def test_compiled_llama_hotswap_never_recompiles(llama, tmp_path, fresh_dynamo):
    """A tiny transformers Llama, fullgraph, PEFT-saved adapters of ranks 4 and 2 swapped
    into a model prepared for rank 4: no recompile, PEFT's logits."""
    peft = pytest.importorskip("peft")
    dirs = []
    for i, kw in enumerate([dict(r=4, lora_alpha=8), dict(r=2, lora_alpha=6), dict(r=4, lora_alpha=2, use_rslora=True)]):
        torch.manual_seed(30 + i)
        cfg = peft.LoraConfig(init_lora_weights=False, target_modules=["q_proj", "v_proj"], **kw)
        pm = peft.get_peft_model(copy.deepcopy(llama), cfg)
        pm.save_pretrained(tmp_path / str(i))
        dirs.append((tmp_path / str(i), logits(pm, input_ids())))
    model = lorakern.load_adapter(copy.deepcopy(llama), dirs[0][0])
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=4)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = input_ids()
    for d, ref in dirs[1:] + dirs[:1]:
        lorakern.hotswap_adapter(compiled, d)
        assert_close(logits(compiled, ids), ref, TOL, d.name)
    assert counter.frame_count == 1


def test_compiled_mixed_batch_then_hotswap_never_recompiles(tmp_path, fresh_dynamo):
    """A mixed batch through the compiled model, then hot-swaps of adapter "a" (same rank,
    then a smaller one, other scalings): no recompile, and every row equals its adapter
    (or the base) run eagerly on a freshly loaded model."""
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8)
    d, _ = save(tmp_path, "d", 2, r=4, lora_alpha=2)
    swaps = [save(tmp_path, "s1", 3, r=4, lora_alpha=5)[0], save(tmp_path, "s2", 4, r=2, lora_alpha=9, use_rslora=True)[0]]
    model = lorakern.load_adapter(mlp(), d)
    lorakern.load_adapter(model, a, adapter_name="a")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    names = ["a", "__base__", "default", "a", "__base__"]
    x = torch.randn(5, 16)
    base_rows = mlp()(x[[1, 4]])
    with torch.no_grad():
        for path in [a, *swaps]:
            if path is not a:
                lorakern.hotswap_adapter(model, path, "a")
            with lorakern.mixed_batch(model, names):
                y = compiled(x)
            assert_close(y[[0, 3]], lorakern.load_adapter(mlp(), path)(x[[0, 3]]), TOL, f"rows of a={path.name}")
            assert_close(y[2:3], lorakern.load_adapter(mlp(), d)(x[2:3]), TOL, "row of default")
            assert_close(y[[1, 4]], base_rows, TOL, "base rows")
    assert counter.frame_count == 1, f"{counter.frame_count} compiled frames"


# ----------------------------------------------------------------------------- padded adapters elsewhere


def _emb_conv_lin() -> nn.Module:
    """An nn.Embedding, an nn.Conv2d and an nn.Linear ("0", "2", "4"): every LoRA layer kind."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 3 * 8 * 8), nn.Unflatten(-1, (3, 8, 8)), nn.Conv2d(3, 4, 3),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def _ids() -> torch.Tensor:
    return torch.tensor([0, 3, 7, 19, 11, 3])


def _train(model, steps=3):
    """A few AdamW steps (weight decay on) on every trainable parameter, then eval mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(_ids()).square().mean().backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("pass_config", [False, True], ids=["config-untouched", "config-padded"])
def test_save_after_prepare_and_training_writes_true_ranks_that_lorakern_and_peft_load(tmp_path, pass_config):
    """Prepared (padded to 6), trained a few AdamW steps, saved: the file holds rank-r
    tensors and a config giving those ranks (also when prepare's `config=` set r and
    rank_pattern to 6, PEFT's semantics), and loads in lorakern and in PEFT with the trained
    model's outputs."""
    peft = pytest.importorskip("peft")
    kw = dict(base=_emb_conv_lin, target_modules=["0", "2", "4"], rank_pattern={"4": 2})
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8, **kw)
    model = lorakern.load_adapter(_emb_conv_lin(), a, is_trainable=True)
    config = adapter_configs(model) if pass_config else None
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=6, config=config)
    if pass_config:
        assert adapter_configs(model)["default"].r == 6
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _train(model)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad), "not trained"
    with torch.no_grad():
        trained = model(_ids())
    lorakern.save_adapter(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert (cfg["r"], cfg["rank_pattern"]) == (4, {"4": 2})
    _, tensors = lorakern.adapters.read_adapter(tmp_path / "out")
    shapes = {k[len(lorakern.adapters.PREFIX):]: tuple(v.shape) for k, v in tensors.items()}
    assert shapes["0.lora_embedding_A"] == (4, 20) and shapes["0.lora_embedding_B"] == (192, 4)
    assert shapes["2.lora_A.weight"] == (4, 3, 3, 3) and shapes["2.lora_B.weight"] == (4, 4, 1, 1)
    assert shapes["4.lora_A.weight"] == (2, 144) and shapes["4.lora_B.weight"] == (5, 2)
    with torch.no_grad():
        assert_close(lorakern.load_adapter(_emb_conv_lin(), tmp_path / "out")(_ids()), trained, TOL, "lorakern load")
        pm = peft.PeftModel.from_pretrained(_emb_conv_lin(), str(tmp_path / "out")).eval()
        assert_close(pm(_ids()), trained, TOL, "PEFT load")


def test_save_refuses_padding_that_is_not_zero(tmp_path):
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8)
    model = lorakern.load_adapter(mlp(), a)
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=6)
    with torch.no_grad():
        dict(lora_layers(model))["2"].lora_B["default"].weight[0, 5] = 0.5
    with pytest.raises(ValueError, match="padding .* is\\s+not zero"):
        lorakern.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists() and not (tmp_path / "out" / CONFIG_NAME).exists()


@pytest.mark.parametrize("r", [1, 3])
def test_load_into_a_padded_adapter_fills_its_leading_rank(tmp_path, r):
    """load_adapter into the padded adapter of the same name: same Parameters and shapes,
    the file's values in the leading rows / columns, the padding zero, outputs of a fresh
    load (r=1 once broadcast one row over the padding)."""
    kw = dict(base=_emb_conv_lin, r=r, lora_alpha=2 * r)
    a, _ = save(tmp_path, "a", 1, **kw)
    b, _ = save(tmp_path, "b", 2, **kw)
    model = lorakern.load_adapter(_emb_conv_lin(), a)
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=5)
    before = params(model)
    lorakern.load_adapter(model, b)
    assert_same_params(model, before)
    for n, layer in lora_layers(model):
        A, B = layer.lora_weights("default")
        assert A.shape[0] == 5 == B.shape[1], n
        assert not A[r:].any() and not B[:, r:].any(), f"{n}: padding not zero"
    with torch.no_grad():
        assert_close(model(_ids()), lorakern.load_adapter(_emb_conv_lin(), b)(_ids()), TOL, "loaded")


def test_failed_load_into_a_padded_adapter_leaves_the_model_unchanged(tmp_path, monkeypatch):
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8)
    model = lorakern.load_adapter(mlp(), a)
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=6)
    state, fields = full_state(model), layer_fields(model)
    other_r, _ = save(tmp_path, "b", 2, r=2, lora_alpha=8)
    with pytest.raises(AdapterLoadError, match="hotswap_adapter"):
        lorakern.load_adapter(model, other_r)
    nan = _weights(tmp_path, lambda t: t[_first_key(t, "2.lora_A")].__setitem__((0, 0), float("nan")))
    with pytest.raises(AdapterLoadError, match="non-finite"):
        lorakern.load_adapter(model, nan)
    assert_same_state(model, state)
    real = lorakern.adapters._write_values

    def write_then_stop(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(lorakern.adapters, "_write_values", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lorakern.load_adapter(model, save(tmp_path, "c", 3, r=4, lora_alpha=8)[0])
    assert_same_state(model, state)
    assert layer_fields(model) == fields


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_combinations_of_padded_adapters_equal_those_of_unpadded_ones(tmp_path, combination_type):
    """add_weighted_adapter over adapters padded by prepare uses each one's own rank: the
    combined adapter equals the one made from unpadded copies (every layer kind)."""
    kw = dict(base=_emb_conv_lin, target_modules=["0", "2", "4"])
    second = dict(r=4, lora_alpha=3) if combination_type == "linear" else dict(r=2, lora_alpha=3, rank_pattern={"2": 3})
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8, **kw)
    b, _ = save(tmp_path, "b", 2, **second, **kw)
    plain = lorakern.load_adapter(_emb_conv_lin(), a)
    lorakern.load_adapter(plain, b, adapter_name="b")
    padded = copy.deepcopy(plain)
    lorakern.prepare_model_for_compiled_hotswap(padded, target_rank=6)
    for model in (plain, padded):
        lorakern.add_weighted_adapter(model, ["default", "b"], [0.7, -1.3], "mix", combination_type=combination_type)
        lorakern.set_adapter(model, "mix")
    layers = dict(lora_layers(padded))
    for n, layer in lora_layers(plain):
        A, B = layer.lora_weights("mix")
        A_pad, B_pad = layers[n].lora_weights("mix")
        assert A.shape == A_pad.shape and torch.equal(A, A_pad) and torch.equal(B, B_pad), n
    with torch.no_grad():
        assert_close(padded(_ids()), plain(_ids()), TOL, combination_type)


@pytest.mark.parametrize("layers", ["embedding", "conv"])
def test_compiled_embedding_and_conv_hotswaps_never_recompile(tmp_path, fresh_dynamo, layers):
    """LoraEmbedding and LoraConv2d read their scalings as tensor mirrors when traced: a
    hot-swap to other alphas and ranks does not recompile (fullgraph aot_eager), and each
    output equals a normal load of that adapter."""
    target = {"embedding": ["0"], "conv": ["2"]}[layers]
    kw = dict(base=_emb_conv_lin, target_modules=target)
    dirs = [save(tmp_path, str(i), 40 + i, **kw, **k)[0]
            for i, k in enumerate([dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=3), dict(r=2, lora_alpha=7, use_rslora=True)])]
    model = lorakern.load_adapter(_emb_conv_lin(), dirs[0])
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=4)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    outputs = []
    with torch.no_grad():
        for d in dirs[1:] + dirs[:1]:
            lorakern.hotswap_adapter(compiled, d)
            out = compiled(_ids())
            assert_close(out, lorakern.load_adapter(_emb_conv_lin(), d)(_ids()), TOL, f"adapter {d.name}")
            outputs.append(out)
    assert counter.frame_count == 1, f"{counter.frame_count} compiled frames: a hot-swap recompiled"
    assert all(not torch.allclose(outputs[i], outputs[i + 1]) for i in range(len(outputs) - 1))


class _Owner(nn.Module):
    """A module owning expert parameters (tests/test_lora_parameter.py's Experts)."""

    def __init__(self):
        from tests.test_lora_parameter import Experts

        super().__init__()
        torch.manual_seed(0)
        self.experts = Experts()

    def forward(self, x, expert):
        return self.experts(x, expert)


def test_adapters_on_parameters_are_never_padded(tmp_path):
    """A LoraParameter (target_parameters) holds one rank-r block per expert (A [r·E, in]):
    prepare refuses to pad it and a hot-swap to a smaller rank is refused (padding its rows
    as one rank mixed the experts' blocks), both leaving the model unchanged; a swap of the
    same rank works."""
    kw = dict(base=_Owner, target_modules=[], target_parameters=["w"])
    a, _ = save(tmp_path, "a", 1, r=2, lora_alpha=4, **kw)
    b, _ = save(tmp_path, "b", 2, r=2, lora_alpha=3, **kw)
    small, _ = save(tmp_path, "c", 3, r=1, lora_alpha=3, **kw)
    model = lorakern.load_adapter(_Owner(), a)
    state, fields = full_state(model), layer_fields(model)
    with pytest.raises(ValueError, match="cannot pad adapters on parameters"):
        lorakern.prepare_model_for_compiled_hotswap(model, target_rank=8)
    with pytest.raises(AdapterLoadError, match="same rank"):
        lorakern.hotswap_adapter(model, small)
    assert_same_state(model, state)
    assert layer_fields(model) == fields
    lorakern.hotswap_adapter(model, b)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert_close(model(x, 1), lorakern.load_adapter(_Owner(), b)(x, 1), RTOL[torch.float64], "same-rank swap")


def test_trainer_state_dict_save_of_a_prepared_model_writes_true_ranks(tmp_path):
    """lorakern.hf.save_pretrained(..., state_dict=...) (the Trainer's ZeRO-3 / FSDP path)
    takes the padded tensors from the state dict and writes them at their own rank, as
    save_adapter does; padding that is not zero is refused."""
    from lorakern import hf

    kw = dict(base=_emb_conv_lin, target_modules=["0", "2", "4"], rank_pattern={"4": 2})
    a, _ = save(tmp_path, "a", 1, r=4, lora_alpha=8, **kw)
    model = lorakern.load_adapter(_emb_conv_lin(), a, is_trainable=True)
    lorakern.prepare_model_for_compiled_hotswap(model, target_rank=6)
    _train(model)
    with torch.no_grad():
        trained = model(_ids())
    hf.save_pretrained(model, tmp_path / "out", state_dict=model.state_dict())
    _, tensors = lorakern.adapters.read_adapter(tmp_path / "out")
    assert tuple(tensors[lorakern.adapters.PREFIX + "4.lora_B.weight"].shape) == (5, 2)
    with torch.no_grad():
        assert_close(lorakern.load_adapter(_emb_conv_lin(), tmp_path / "out")(_ids()), trained, TOL, "reloaded")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["4.lora_B.default.weight"][0, 5] = 0.5
    with pytest.raises(ValueError, match="padding in the state_dict is not zero"):
        hf.save_pretrained(model, tmp_path / "bad", state_dict=sd)
