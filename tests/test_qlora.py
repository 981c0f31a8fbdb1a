"""QLoRA: LoRA over quantized bases (lorakern's QuantLinear, bitsandbytes' Linear4bit).

The oracle is "dequantise with bitsandbytes (or lorakern.quant, bit-identical to it), then
the dense op / plain PyTorch"; bitsandbytes and PEFT are test dependencies only.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakern
from lorakern.qops import lora_linear_quantized
from lorakern.quant import dequantize_weight, quantize_weight
from lorakern.quantized import QuantLinear, quantize, quantized_weight
from tests.conftest import backend_device, requires_triton
from tests.utils import RTOL, assert_close

BACKENDS = ["reference", pytest.param("triton", marks=requires_triton)]


def _plain_lora(x, W, bias, A, B, s):
    """fp64 plain-PyTorch LoRA linear (no dropout): the oracle."""
    x, W, A, B = x.double(), W.double(), A.double(), B.double()
    y = x @ W.t() + s * (x @ A.t()) @ B.t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead", [(3, 7), (80,)], ids=["M21", "M80"])
def test_quantized_op_every_gradient(backend, quant_type, dtype, lead):
    """y and dx, dA, dB, dbias of the QLoRA op equal the dense math on the dequantised weight
    (Triton: M = 21 reads the quantized weight in the GEMM, M = 80 dequantises first)."""
    dev = backend_device(backend)
    n, k, r = 40, 72, 5
    qw = quantize_weight(torch.randn(n, k, device=dev, dtype=dtype), quant_type, 32, double_quant=quant_type != "int8")
    W = dequantize_weight(qw, dtype)
    x = torch.randn(*lead, k, device=dev, dtype=dtype, requires_grad=True)
    A = torch.randn(r, k, device=dev, requires_grad=True)
    B = torch.randn(n, r, device=dev, requires_grad=True)
    bias = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
    y = lora_linear_quantized(x, qw, bias, A, B, 0.75, backend=backend)
    ref = _plain_lora(x, W, bias, A, B, 0.75)
    assert_close(y, ref, RTOL[dtype], "y")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B, bias), g)
    want = torch.autograd.grad(ref, (x, A, B, bias), g.double())
    for name, a, b in zip(("dx", "dA", "dB", "dbias"), got, want):
        assert a.dtype == {"dx": dtype, "dbias": dtype}.get(name, torch.float32)
        assert_close(a, b, RTOL[dtype], name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_op_dropout_matches_dense_op(backend):
    """With dropout the QLoRA op is the dense op on the dequantised weight, same seed, same mask."""
    dev = backend_device(backend)
    qw = quantize_weight(torch.randn(24, 64, device=dev), "nf4", 64, double_quant=True)
    W = dequantize_weight(qw)
    x = torch.randn(9, 64, device=dev, requires_grad=True)
    A = torch.randn(4, 64, device=dev, requires_grad=True)
    B = torch.randn(24, 4, device=dev, requires_grad=True)
    y = lora_linear_quantized(x, qw, None, A, B, 0.5, dropout_p=0.3, seed=11, backend=backend)
    y2 = lorakern.lora_linear(x, W, None, A, B, 0.5, dropout_p=0.3, seed=11, backend=backend)
    # Triton at small M reads the 4-bit weight in its K loop (lorakern/kernels/qgemm.py): the same
    # mask and math, another fp32 summation order. The reference is the dense op exactly.
    tol = 0.0 if backend == "reference" else RTOL[torch.float32]
    assert_close(y, y2, tol, "y")
    g = torch.randn_like(y)
    for name, a, b in zip("x A B".split(), torch.autograd.grad(y, (x, A, B), g), torch.autograd.grad(y2, (x, A, B), g)):
        assert_close(a, b, tol, "d" + name)


def test_quantized_op_saves_no_dense_weight():
    """The backward rebuilds the dense weight: nothing N×K and floating is saved for it."""
    n, k = 96, 128
    qw = quantize_weight(torch.randn(n, k), "nf4", 64, double_quant=True)
    x = torch.randn(4, k, requires_grad=True)
    A, B = torch.randn(8, k, requires_grad=True), torch.randn(n, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear_quantized(x, qw, None, A, B, 1.0, dropout_p=0.1)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= n * k]
    y.sum().backward()
    assert x.grad is not None and A.grad is not None


def test_quantized_op_errors_name_shapes():
    qw = quantize_weight(torch.randn(24, 64), "nf4")
    A, B = torch.randn(4, 64), torch.randn(24, 4)
    with pytest.raises(ValueError, match="last dim 63"):
        lora_linear_quantized(torch.randn(2, 63), qw, None, A, B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[24, 4\]"):
        lora_linear_quantized(torch.randn(2, 64), qw, None, A, torch.randn(23, 4), 1.0)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        lora_linear_quantized(torch.randn(2, 64), torch.randn(24, 64), None, A, B, 1.0)


# --- QuantLinear / quantize(model) --------------------------------------------------


def _mlp():
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_quantize_model_and_lora_layer(quant_type):
    """quantize() swaps nn.Linear for QuantLinear (skipping named modules); a LoraLinear over
    it equals the dense LoraLinear over the dequantised weight, gradients included."""
    model = _mlp()
    quantize(model, quant_type, blocksize=32, compute_dtype=None, skip_modules=["4"])
    assert [type(m).__name__ for m in model] == ["QuantLinear", "ReLU", "QuantLinear", "ReLU", "Linear"]
    base = model[0]
    dense = nn.Linear(64, 96)
    with torch.no_grad():
        dense.weight.copy_(dequantize_weight(base.quantized_weight(), torch.float32))
        dense.bias.copy_(base.bias)
    q = lorakern.LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    d = lorakern.LoraLinear(dense, r=4, lora_alpha=8, init_lora_weights=False)
    d.load_state_dict({**d.state_dict(), "lora_A.default.weight": q.lora_A["default"].weight,
                       "lora_B.default.weight": q.lora_B["default"].weight})
    x = torch.randn(5, 64, requires_grad=True)
    yq, yd = q(x), d(x)
    assert torch.equal(yq, yd)
    gq = torch.autograd.grad(yq.sum(), (x, q.lora_A["default"].weight, q.lora_B["default"].weight))
    gd = torch.autograd.grad(yd.sum(), (x, d.lora_A["default"].weight, d.lora_B["default"].weight))
    for a, b in zip(gq, gd):
        assert torch.equal(a, b)


def test_quantize_skips_output_head_and_refuses_lora_models():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_llama_config())
    quantize(model, "nf4")
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    lorakern.inject(model, lorakern.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="before inject"):
        quantize(model, "nf4")


def test_quantize_bad_weight_leaves_model_unchanged():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize(model, "nf4")
    assert all(type(m) is not QuantLinear for m in model)


def test_quantlinear_survives_dtype_casts_and_memory_bound():
    """model.to(bf16) converts the bias, never the fp32 statistics (stored as int32 views)."""
    layer = QuantLinear.from_linear(nn.Linear(4096, 256), "nf4", 64, double_quant=True)
    before = layer.quantized_weight()
    w_before = dequantize_weight(before, torch.float32)
    layer.to(torch.bfloat16)
    after = layer.quantized_weight()
    assert after.absmax.dtype == torch.uint8 and after.nested_absmax.dtype == torch.float32
    assert torch.equal(dequantize_weight(after, torch.float32), w_before)
    assert before.bits_per_parameter() <= 4.13  # QLoRA's 4 + 0.127


def test_quantlinear_alone_trains_through():
    """A quantized layer without LoRA passes dx (through the dequantised weight) and saves no dense weight."""
    lin = nn.Linear(64, 48)
    ql = QuantLinear.from_linear(lin, "fp4", 64)
    W = dequantize_weight(ql.quantized_weight(), torch.float32)
    x = torch.randn(6, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ql(x)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 64 * 48]
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert_close(y, x.double() @ W.double().t() + ql.bias.double(), RTOL[torch.float32])
    assert_close(gx, torch.ones(6, 48, dtype=torch.float64) @ W.double(), RTOL[torch.float32])


def test_merge_into_quantized_base_is_lossy_and_warns():
    base = QuantLinear.from_linear(nn.Linear(64, 32), "nf4", 64, double_quant=True)
    layer = lorakern.LoraLinear(base, r=4, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.01)
    x = torch.randn(8, 64)
    y = layer(x)
    with pytest.warns(UserWarning, match="quantized"):
        layer.merge()
    assert layer.merged
    # Merged: the base alone, requantized; close to the unmerged output, not equal.
    assert_close(layer(x), y, 0.2, "merged")
    with pytest.warns(UserWarning, match="quantized"):
        layer.unmerge()
    assert_close(layer(x), y, 0.2, "unmerged")


def test_compile_fullgraph_quantized_layer():
    base = QuantLinear.from_linear(nn.Linear(64, 32), "nf4", 64, double_quant=True)
    layer = lorakern.LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(5, 64, requires_grad=True)
    eager = layer(x)
    g_eager = torch.autograd.grad(eager.sum(), (x, layer.lora_A["default"].weight))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    g = torch.autograd.grad(out.sum(), (x, layer.lora_A["default"].weight))
    assert torch.equal(out, eager)
    for a, b in zip(g, g_eager):
        assert_close(a, b, 1e-6)


def test_checkpointing_with_dropout_quantized():
    """Activation checkpointing recomputes the same mask (seed from the CPU generator)."""
    from torch.utils.checkpoint import checkpoint

    base = QuantLinear.from_linear(nn.Linear(64, 32), "nf4", 64)
    layer = lorakern.LoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.25, init_lora_weights=False).train()
    x = torch.randn(5, 64, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    g = torch.autograd.grad(y.sum(), (x, layer.lora_A["default"].weight))
    torch.manual_seed(3)
    yc = checkpoint(layer, x, use_reentrant=False)
    gc = torch.autograd.grad(yc.sum(), (x, layer.lora_A["default"].weight))
    assert torch.equal(y, yc)
    for a, b in zip(g, gc):
        assert torch.equal(a, b)


def test_autocast_quantized_layer_computes_in_autocast_dtype():
    base = QuantLinear.from_linear(nn.Linear(64, 32), "nf4", 64, compute_dtype=None)
    layer = lorakern.LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    W = dequantize_weight(base.quantized_weight(), torch.bfloat16)
    ref = _plain_lora(x.bfloat16(), W, base.bias.bfloat16(), layer.lora_A["default"].weight,
                      layer.lora_B["default"].weight, layer.scaling["default"])
    assert_close(y, ref, RTOL[torch.bfloat16])


# --- bitsandbytes + PEFT models -------------------------------------------------------


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def bnb_llama_dir(tmp_path_factory):
    """A tiny Llama checkpoint on disk (random weights), loaded 4-bit by each test."""
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(_llama_config()).save_pretrained(path)
    return path


def _load_4bit(path, compute_dtype=torch.float32, double_quant=True):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


TARGETS = ["q_proj", "v_proj", "down_proj"]


def _grads(model):
    return {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _step(model, ids):
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach()


def test_bnb_dequant_matches_lorakern_on_loaded_layer(bnb_llama_dir):
    model = _load_4bit(bnb_llama_dir)
    import bitsandbytes.functional as bf

    layer = model.model.layers[0].mlp.down_proj
    want = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(dequantize_weight(quantized_weight(layer)), want)


def test_patch_peft_qlora_gives_peft_numbers(bnb_llama_dir):
    """patch_peft routes PEFT's bnb Linear4bit LoRA layers through the fused op: PEFT's logits and gradients."""
    import peft

    model = peft.get_peft_model(_load_4bit(bnb_llama_dir), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                            init_lora_weights=False))
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    logits = _step(model, ids)
    grads = _grads(model)
    model.zero_grad()
    assert lorakern.patch_peft(model) == 6
    assert_close(_step(model, ids), logits, 1e-6, "logits")
    for name, g in _grads(model).items():
        assert_close(g, grads[name], 1e-5, name)


def test_inject_on_bnb_model_matches_peft_and_files_round_trip(bnb_llama_dir, tmp_path):
    """lorakern.inject on a bitsandbytes-quantized model (it crashed before); with PEFT's A/B
    (loaded from PEFT's adapter files) it gives PEFT's logits and gradients, and its saved
    adapter loads back into PEFT."""
    import peft

    peft_model = peft.get_peft_model(_load_4bit(bnb_llama_dir),
                                     peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    peft_model.train()
    ids = torch.randint(0, 128, (2, 9))
    want_logits = _step(peft_model, ids)
    want = _grads(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")

    ours = _load_4bit(bnb_llama_dir)
    lorakern.load_adapter(ours, tmp_path / "peft", is_trainable=True)
    ours.train()
    assert_close(_step(ours, ids), want_logits, 1e-6, "logits")
    got = _grads(ours)
    for name, g in want.items():
        assert_close(got[name.replace("base_model.model.", "")], g, 1e-5, name)

    lorakern.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_load_4bit(bnb_llama_dir), tmp_path / "ours")
    back.train()
    with torch.no_grad():
        assert_close(back(ids).logits, want_logits, 1e-6, "PEFT loading lorakern's file")


def test_inject_bnb_bf16_compute_within_bf16_bar(bnb_llama_dir):
    """bf16 compute dtype: lorakern vs "bitsandbytes-dequantised weight, then plain PyTorch"."""
    model = _load_4bit(bnb_llama_dir, compute_dtype=torch.bfloat16)
    layer = model.model.layers[1].self_attn.v_proj
    W = dequantize_weight(quantized_weight(layer), torch.bfloat16)
    lora = lorakern.LoraLinear(layer, r=8, lora_alpha=16, init_lora_weights=False)
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    ref = _plain_lora(x, W, None, A, B, lora.scaling["default"])
    assert_close(y, ref, RTOL[torch.bfloat16], "y")
    g = torch.randn_like(y)
    for name, a, b in zip(("dx", "dA", "dB"), torch.autograd.grad(y, (x, A, B), g),
                          torch.autograd.grad(ref, (x, A, B), g.double())):
        assert_close(a, b, RTOL[torch.bfloat16], name)


def test_bnb_cpu_repacked_weight_is_read_back(bnb_llama_dir):
    """bitsandbytes repacks a Linear4bit's weight on CPU when it runs in eval without grad,
    rounding each absmax to bfloat16 as it does; LoraLinear undoes the layout before
    reading (and then never calls bnb's forward), so it sees exactly what bnb now holds."""
    model = _load_4bit(bnb_llama_dir, double_quant=False)
    layer = model.model.layers[0].mlp.down_proj  # in_features 128: two absmax blocks per row
    original = quantized_weight(copy.deepcopy(layer))
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this bitsandbytes build did not repack the weight (no AVX512-BF16)")
    lora = lorakern.LoraLinear(layer, r=4, lora_alpha=4)
    original.absmax = original.absmax.bfloat16().float()
    assert torch.equal(dequantize_weight(quantized_weight(lora.base_layer)), dequantize_weight(original))


def test_bnb_int8_base_matches_peft(bnb_llama_dir, tmp_path):
    """A bitsandbytes Linear8bitLt base (LLM.int8) runs its own forward and the fused op adds
    the LoRA term, as PEFT's 8-bit layer does: PEFT's logits and gradients; merging is refused."""
    import peft
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LlamaForCausalLM.from_pretrained(bnb_llama_dir, device_map="cpu",
                                                    quantization_config=BitsAndBytesConfig(load_in_8bit=True))

    peft_model = peft.get_peft_model(load(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                             init_lora_weights=False))
    peft_model.train()
    ids = torch.randint(0, 128, (2, 9))
    want_logits = _step(peft_model, ids)
    want = _grads(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = lorakern.load_adapter(load(), tmp_path, is_trainable=True).train()
    assert_close(_step(ours, ids), want_logits, 1e-6, "logits")
    got = _grads(ours)
    for name, g in want.items():
        assert_close(got[name.replace("base_model.model.", "")], g, 1e-5, name)
    with pytest.raises(NotImplementedError, match="Linear8bitLt"):
        lorakern.merge(ours)


def test_trainable_parameter_counts_match_peft(bnb_llama_dir):
    import peft

    config = dict(r=8, lora_alpha=16, target_modules=TARGETS)
    peft_model = peft.get_peft_model(_load_4bit(bnb_llama_dir), peft.LoraConfig(**config))
    ours = lorakern.inject(_load_4bit(bnb_llama_dir), lorakern.LoraConfig(**config))
    assert lorakern.trainable_parameters(ours) == tuple(peft_model.get_nb_trainable_parameters())


def test_lorakern_quantized_model_adapter_round_trip(tmp_path):
    """save_adapter / load_adapter on a lorakern-quantized model: the same logits after loading."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dense = LlamaForCausalLM(_llama_config())
    first, second = copy.deepcopy(dense), copy.deepcopy(dense)
    for model in (first, second):
        quantize(model, "nf4", compute_dtype=torch.float32)
    config = lorakern.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lorakern.inject(first, config)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        want = first(ids).logits
    lorakern.save_adapter(first, tmp_path)
    lorakern.load_adapter(second, tmp_path)
    with torch.no_grad():
        assert torch.equal(second(ids).logits, want)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_qdora_on_bnb_model_matches_peft(bnb_llama_dir, dropout, tmp_path):
    """DoRA over bitsandbytes NF4 (PEFT's QDoRA, use_dora=True on Linear4bit): PEFT's
    magnitude init, logits and gradients; the norm's W Aᵀ read through the quantized GEMM."""
    import peft

    kw = dict(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, use_dora=True, lora_dropout=dropout)
    # the magnitude starts at the dequantised weight's row norms (B = 0 with the default init)
    init = dict(kw, init_lora_weights=True)
    peft_init = peft.get_peft_model(_load_4bit(bnb_llama_dir), peft.LoraConfig(**init)).state_dict()
    fresh = lorakern.inject(_load_4bit(bnb_llama_dir), lorakern.LoraConfig(**init)).state_dict()
    mags = [k for k in fresh if "lora_magnitude_vector" in k]
    assert mags
    for k in mags:
        assert_close(fresh[k], peft_init["base_model.model." + k], 1e-6, k)
    peft_model = peft.get_peft_model(_load_4bit(bnb_llama_dir), peft.LoraConfig(**kw))
    peft_model.train()
    ids = torch.randint(0, 128, (2, 9))
    torch.manual_seed(4)
    want_logits = _step(peft_model, ids)
    want = _grads(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = _load_4bit(bnb_llama_dir)
    lorakern.load_adapter(ours, tmp_path / "peft", is_trainable=True)
    ours.train()
    torch.manual_seed(4)
    assert_close(_step(ours, ids), want_logits, 1e-6, "logits")
    got = _grads(ours)
    assert any("lora_magnitude_vector" in n for n in got)
    for name, g in want.items():
        assert_close(got[name.replace("base_model.model.", "")], g, 1e-5, name)
    with pytest.raises(NotImplementedError, match="DoRA adapter into a quantized base"):
        lorakern.merge(ours)
