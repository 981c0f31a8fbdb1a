"""PEFT's lora_bias=True: lora_B has a bias b and the adapter adds s·b to the output.

Compared with the real PEFT on a tiny Llama (no base biases: merging must be refused, as
PEFT does) and a tiny GPT-2 (Conv1D bases with biases): logits, every gradient (lora_B's
bias included), adapter files both ways, and merge / unmerge; plus the layer-level paths
(several adapters, a quantized base) against plain torch math, and the refusals.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakern
from lorakern.quant import dequantize_weight
from lorakern.quantized import QuantLinear, quantized_weight
from lorakern.adapters import adapter_state_dict, read_adapter
from lorakern.model import adapter_configs, lora_layers
from tests.utils import assert_close

pytestmark = pytest.mark.usefixtures("quiet_warnings")

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

PREFIX = "base_model.model."
LOGITS_TOL = 1e-6
GRAD_TOL = 1e-5


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=False, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from tests.test_model_helpers import tiny_gpt2

    return tiny_gpt2()  # random (non-zero) biases everywhere


CASES = {
    "llama": (_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (_gpt2, dict(r=4, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, kwargs = CASES[request.param]
    kwargs = dict(kwargs, lora_bias=True, init_lora_weights=False)
    base = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_B." in name and name.endswith(".bias"):
                p.normal_(0, 0.5)
    pm.eval()
    return request.param, base, kwargs, pm


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def _lorakern_copy(base, kwargs, pm):
    """A lorakern model injected with the same config, holding PEFT's values."""
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**kwargs)).eval()
    theirs = pm.state_dict()
    ours = model.state_dict()
    assert {PREFIX + k for k in ours} == set(theirs)
    assert any(k.endswith(".lora_B.default.bias") for k in ours)
    model.load_state_dict({k: theirs[PREFIX + k] for k in ours})
    return model


def _logits(model, ids):
    return model(input_ids=ids).logits


def test_logits_and_gradients_match_peft(case):
    name, base, kwargs, pm = case
    model = _lorakern_copy(base, kwargs, pm)
    ids = _ids()
    ref = _logits(pm, ids)
    out = _logits(model, ids)
    assert_close(out, ref, LOGITS_TOL, "logits")
    # lora_B's bias is visible in the output: zeroing it changes the logits.
    assert not torch.allclose(ref, _logits(base, ids))

    # Gradients in fp64 on both sides: in fp32 the tiny q_proj gradients of a random-init
    # attention (near-uniform softmax) carry cancellation noise of ~1e-4 relative in either library.
    pm, model = copy.deepcopy(pm).double(), model.double()
    ref, out = _logits(pm, ids), _logits(model, ids)
    assert_close(out, ref, 1e-12, "fp64 logits")
    target = torch.randn_like(ref)
    ((ref - target) ** 2).mean().backward()
    ((out - target) ** 2).mean().backward()
    ours = dict(model.named_parameters())
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert any(n.endswith("lora_B.default.bias") for n, _ in trainable)
    for n, p in trainable:
        mine = ours[n.removeprefix(PREFIX)]
        assert mine.requires_grad, n
        assert mine.grad is not None and p.grad is not None, n
        assert_close(mine.grad, p.grad, GRAD_TOL, n)


def test_peft_file_loads_in_lorakern_and_back(case, tmp_path):
    name, base, kwargs, pm = case
    ids = _ids()
    ref = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft")
    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert adapter_configs(model)["default"].lora_bias is True
    assert_close(_logits(model, ids), ref, LOGITS_TOL, "logits (PEFT file in lorakern)")

    lorakern.save_adapter(model, tmp_path / "lk")
    keys = adapter_state_dict(model)
    assert any(k.endswith(".lora_B.bias") for k in keys)
    assert set(keys) == set(read_adapter(tmp_path / "peft")[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk").eval()
    assert back.peft_config["default"].lora_bias is True
    assert_close(_logits(back, ids), ref, LOGITS_TOL, "logits (lorakern file in PEFT)")


def test_merge_unmerge_matches_peft(case):
    name, base, kwargs, pm = case
    model = _lorakern_copy(base, kwargs, pm)
    ids = _ids()
    before = _logits(model, ids)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.bias")}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    if name == "llama":  # no base biases: PEFT refuses to merge, and so does lorakern (nothing changed)
        with pytest.raises(RuntimeError, match="no bias"):
            copy.deepcopy(pm).merge_and_unload()
        with pytest.raises(RuntimeError, match="no bias"):
            lorakern.merge(model)
        assert not any(layer.merged for _, layer in lora_layers(model))
        for n, p in model.named_parameters():
            if n in weights:
                assert torch.equal(p, weights[n]), n
        return
    ref = _logits(copy.deepcopy(pm).merge_and_unload(), ids)
    lorakern.merge(model)
    assert_close(_logits(model, ids), ref, LOGITS_TOL, "merged logits")
    moved = [n for n, p in model.named_parameters() if n in biases and not torch.equal(p, biases[n])]
    assert moved, "merge did not change the base biases"
    lorakern.unmerge(model)
    for n, p in model.named_parameters():
        if n in biases:
            assert_close(p, biases[n], 1e-6, n)
    assert_close(_logits(model, ids), before, LOGITS_TOL, "unmerged logits")
    unloaded = lorakern.unload(copy.deepcopy(model))
    assert_close(_logits(unloaded, ids), ref, LOGITS_TOL, "merge_and_unload logits")


# ---- layer level -------------------------------------------------------------------------


def _ref(x, W, bias, adapters):
    y = x @ W.t() + (0 if bias is None else bias)
    for A, B, b, s in adapters:
        y = y + s * ((x @ A.t()) @ B.t() + (0 if b is None else b))
    return y


@pytest.mark.parametrize("with_base_bias", [True, False])
def test_several_adapters_sum_their_biases(with_base_bias):
    torch.manual_seed(0)
    layer = lorakern.LoraLinear(nn.Linear(16, 12, bias=with_base_bias), r=3, lora_alpha=5,
                                init_lora_weights=False, lora_bias=True, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.update_layer("b", 2, 7, init_lora_weights=False, lora_bias=True)
    layer.update_layer("c", 4, 2, init_lora_weights=False)  # no lora_bias
    layer.set_adapter(["default", "b", "c"])
    with torch.no_grad():
        for n in ("default", "b"):
            layer.lora_B[n].bias.normal_()
    x = torch.randn(2, 5, 16)
    y = layer(x)
    base = layer.base_layer
    adapters = [
        (layer.lora_A[n].weight, layer.lora_B[n].weight, layer.lora_B[n].bias, layer.scaling[n])
        for n in ("default", "b", "c")
    ]
    ref = _ref(x, base.weight, base.bias, adapters)
    assert_close(y, ref, 1e-6, "y")
    y.square().sum().backward()
    ref_b = {n: layer.lora_B[n].bias.grad.clone() for n in ("default", "b")}
    for p in layer.parameters():
        p.grad = None
    leaves = [(A.detach().requires_grad_(), B.detach().requires_grad_(), None if b is None else b.detach().requires_grad_(), s)
              for A, B, b, s in adapters]
    _ref(x, base.weight, base.bias, leaves).square().sum().backward()
    for n, (_, _, b, _) in zip(("default", "b"), leaves):
        assert_close(ref_b[n], b.grad, 1e-5, f"{n} bias grad")
    assert layer.lora_B["c"].bias is None
    if not with_base_bias:
        with pytest.raises(RuntimeError, match="no bias"):
            layer.merge()
        assert not layer.merged
    else:
        w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
        layer.merge()
        assert_close(layer(x), ref, 1e-6, "merged")
        layer.unmerge()
        assert_close(base.bias, b0, 1e-6, "bias after unmerge")
        assert_close(base.weight, w0, 1e-6, "weight after unmerge")


def test_quantized_base_adds_lora_bias():
    torch.manual_seed(1)
    qbase = QuantLinear.from_linear(nn.Linear(64, 32), "nf4", 64)
    layer = lorakern.LoraLinear(qbase, r=4, lora_alpha=8, init_lora_weights=False, lora_bias=True, backend="reference")
    with torch.no_grad():
        layer.lora_B["default"].bias.normal_()
    x = torch.randn(3, 64)
    W = dequantize_weight(quantized_weight(qbase), torch.float32)
    A, B, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    y = layer(x)
    ref = _ref(x, W, qbase.bias, [(A, B, b, layer.scaling["default"])])
    assert_close(y, ref, 1e-5, "y")
    y.sum().backward()
    assert_close(b.grad, torch.full_like(b, 3 * layer.scaling["default"]), 1e-6, "bias grad")


def test_default_init_zero_bias_and_refusals():
    layer = lorakern.LoraLinear(nn.Linear(8, 6), r=2, lora_bias=True)
    assert torch.equal(layer.lora_B["default"].bias, torch.zeros(6))
    assert layer.lora_B["default"].bias.dtype == torch.float32
    x = torch.randn(4, 8)
    assert_close(layer(x), layer.base_layer(x), 1e-6, "zero-initialised adapter")
    with pytest.raises(ValueError, match="use_dora"):
        lorakern.LoraLinear(nn.Linear(8, 6), r=2, lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        lorakern.LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        lorakern.LoraConfig(lora_bias=True, init_lora_weights="gaussian")
    with pytest.raises(TypeError, match="lora_bias"):
        lorakern.LoraConfig(lora_bias="true")
    cfg = lorakern.LoraConfig(r=2, lora_bias=True, target_modules=["q"])
    d = cfg.to_peft_dict()
    assert d["lora_bias"] is True
    assert lorakern.LoraConfig.from_peft_dict(d).lora_bias is True
    assert lorakern.LoraConfig().to_peft_dict()["lora_bias"] is False


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mixed_batch_adds_each_rows_lora_bias_as_peft(case, backend):
    """Two lora_bias adapters and base rows in one batch: PEFT's mixed-batch logits (its
    lora_B(lora_A(x))·s carries s·b into the adapter's rows only), on both mixed paths."""
    if backend == "triton":
        pytest.importorskip("triton")
    name, base, kwargs, pm = case
    pm = copy.deepcopy(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("other", peft.LoraConfig(**dict(kwargs, r=2, lora_alpha=3)))
    torch.manual_seed(12)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".other." in n:
                p.normal_(0, 0.5)
    pm.eval()
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**kwargs), backend=backend)
    lorakern.inject(model, lorakern.LoraConfig(**dict(kwargs, r=2, lora_alpha=3)), adapter_name="other", backend=backend)
    theirs = pm.state_dict()
    model.load_state_dict({k: theirs[PREFIX + k] for k in model.state_dict()})
    model.eval()
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        ref = pm(input_ids=ids, adapter_names=names).logits
        with lorakern.mixed_batch(model, names):
            out = _logits(model, ids)
    assert_close(out, ref, LOGITS_TOL, f"{name} mixed logits")
    # and the biases do reach their rows: without them the adapter rows differ
    with torch.no_grad():
        for layer in (m for _, m in lora_layers(model)):
            for b in ("default", "other"):
                layer.lora_B[b].bias.zero_()
        with lorakern.mixed_batch(model, names):
            zeroed = _logits(model, ids)
    assert not torch.allclose(zeroed[0], out[0]) and not torch.allclose(zeroed[2], out[2])
    assert_close(zeroed[1], out[1], LOGITS_TOL, "base row")
