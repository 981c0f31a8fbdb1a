"""patch_peft and PEFT's own mixed batches (`peft_model(..., adapter_names=[...])`, issue 14).

A patched PEFT LoRA Linear runs `forward(x, adapter_names=[...])` through
`lorakern.lora_linear_mixed` on PEFT's parameters. On tiny Llama (nn.Linear), GPT-2
(Conv1D, fan_in_fan_out) and BERT models built from configs, with three adapters of
different ranks, alphas, targets and rsLoRA:
- logits equal PEFT's unpatched mixed-batch logits (interleaved names, "__base__" rows,
  an adapter only some layers have), one op call per patched layer;
- gradients equal PEFT's (model level in eval mode, which is all PEFT allows there;
  layer level in training mode with dropout 0); adapters no row uses get none;
- dropout in training: each adapter's rows get the op's seeded dropout, base rows none;
- what the op cannot reproduce goes to PEFT's forward (non-nn.Dropout, lora_bias, a
  disabled or merged layer, DoRA), and PEFT's errors stay PEFT's.
Comparisons are fp32 at RTOL[float32] (the math is the same; differences are rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakern
import lorakern.peft_compat as peft_compat
from tests.test_model_helpers import input_ids
from tests.utils import RTOL, assert_close, rel_error

pytestmark = pytest.mark.usefixtures("quiet_warnings")

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

TOL = RTOL[torch.float32]
BASE = "__base__"
NAMES = ("one", "two", "tri")
ROWS = ["two", "one", BASE, "tri", "one", "two", BASE]  # odd count, interleaved, "tri" only in some layers


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(31)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


# (config of "one", "two", "tri") per model; init_lora_weights=False added below
CONFIGS = {
    "llama": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=2, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "o_proj", "gate_proj"]),
        dict(r=1, lora_alpha=3, target_modules=["v_proj"]),
    ),
    "gpt2": (
        dict(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        dict(r=3, lora_alpha=7, use_rslora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        dict(r=1, lora_alpha=2, target_modules=["c_fc"], fan_in_fan_out=True),
    ),
    "bert": (
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
        dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["key", "dense"], modules_to_save=["classifier"]),
        dict(r=1, lora_alpha=5, target_modules=["value"], modules_to_save=["classifier"]),  # PEFT needs a copy per name
    ),
}


def _base(case, request):
    return tiny_bert() if case == "bert" else request.getfixturevalue(case)


def _peft(base, configs, **extra):
    """PEFT model with adapters "one", "two", "tri" (random A and B), eval mode."""
    kws = [dict(kw, init_lora_weights=False, **extra) for kw in configs]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kws[0]), adapter_name=NAMES[0])
    for name, kw in zip(NAMES[1:], kws[1:]):
        pm.add_adapter(name, peft.LoraConfig(**kw))
    with torch.no_grad():  # modules_to_save copies that differ from the original
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    return pm.eval()


def _lora_params(pm):
    """Every adapter parameter (PEFT makes only the active adapter's trainable)."""
    params = {n: p for n, p in pm.named_parameters() if "lora_" in n or ".modules_to_save." in n}
    for p in params.values():
        p.requires_grad_(True)
    return params


@pytest.fixture
def count_mixed(monkeypatch):
    """A list that gets one entry (the row_adapter list) per lora_linear_mixed call of patched layers."""
    calls = []
    real = peft_compat.lora_linear_mixed

    def counted(*args, **kwargs):
        calls.append(list(args[6]))
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_compat, "lora_linear_mixed", counted)
    return calls


def _run(pm, ids, names, g, params):
    for p in params.values():
        p.grad = None
    out = pm(input_ids=ids, adapter_names=names).logits
    (out * g).sum().backward()
    return out.detach(), {n: p.grad for n, p in params.items()}


@pytest.mark.parametrize("case", ["llama", "gpt2", "bert"])
def test_patched_mixed_batch_equals_peft_logits_and_grads(case, request, count_mixed):
    pm = _peft(_base(case, request), CONFIGS[case])
    params = _lora_params(pm)
    ids = input_ids(batch=len(ROWS), seq=5, seed=11)
    with torch.no_grad():
        g = torch.randn_like(pm(input_ids=ids).logits)
    ref, ref_grads = _run(pm, ids, ROWS, g, params)
    before = dict(pm.named_parameters())

    n = lorakern.patch_peft(pm)
    out, grads = _run(pm, ids, ROWS, g, params)
    assert len(count_mixed) == n, "one lora_linear_mixed call per patched layer"
    assert dict(pm.named_parameters()) == before  # PEFT's own Parameter objects: nothing copied
    assert_close(out, ref, TOL, f"{case} mixed-batch logits")
    assert not torch.allclose(out[0], out[1])  # different adapters do differ
    for name, grad in grads.items():
        if ref_grads[name] is None:  # e.g. a modules_to_save copy of an adapter that is not in ROWS
            assert grad is None, name
        else:
            assert_close(grad, ref_grads[name], TOL, f"grad {name}")
    assert sum(g is not None for g in grads.values()) > 0

    # rows of the base alone: the same as the unpatched PEFT model with its adapters disabled
    with torch.no_grad():
        only_base = pm(input_ids=ids, adapter_names=[BASE] * len(ROWS)).logits
        with pm.disable_adapter():
            disabled = pm(input_ids=ids).logits
    assert_close(only_base, disabled, TOL, "all rows __base__")
    assert lorakern.unpatch_peft(pm) == n


def test_adapter_no_row_uses_gets_no_gradient(llama, count_mixed):
    pm = _peft(llama, CONFIGS["llama"])
    params = _lora_params(pm)
    lorakern.patch_peft(pm)
    ids = input_ids(batch=4, seq=3, seed=5)
    pm(input_ids=ids, adapter_names=["one", BASE, "one", "tri"]).logits.sum().backward()
    assert count_mixed and all(rows for rows in count_mixed)
    for name, p in params.items():
        used = ".one." in name or ".tri." in name
        assert (p.grad is not None) == used, name


def _layers(pm):
    """(name, PEFT LoRA Linear) of a PEFT model, in module order."""
    from peft.tuners.lora.layer import Linear

    return [(n, m) for n, m in pm.named_modules() if isinstance(m, Linear)]


@pytest.mark.parametrize("case, layer_name", [("llama", "q_proj"), ("gpt2", "c_attn"), ("bert", "value")])
def test_layer_in_training_mode_same_output_and_grads(case, layer_name, request, count_mixed):
    """PEFT's layers take adapter_names in training mode too (only the model-level call refuses)."""
    pm = _peft(_base(case, request), CONFIGS[case])
    _, layer = next((n, m) for n, m in _layers(pm) if n.endswith(layer_name))
    layer.train()
    assert len(layer.lora_A) >= 2 and set(layer.lora_A) != set(NAMES)  # some name this layer lacks
    params = {n: p.requires_grad_(True) for n, p in layer.named_parameters() if "lora_" in n}
    torch.manual_seed(2)
    names = ["one", BASE, "two", "two", "one", "tri"]
    x = torch.randn(len(names), 3, layer.in_features)
    g = torch.randn(len(names), 3, layer.out_features)

    def run():
        for p in params.values():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        y = layer(xi, adapter_names=names)
        (y * g).sum().backward()
        return y.detach(), xi.grad, {n: p.grad for n, p in params.items()}

    ref_y, ref_dx, ref_grads = run()
    lorakern.patch_peft(pm)
    y, dx, grads = run()
    assert len(count_mixed) == 1
    assert_close(y, ref_y, TOL, "y")
    assert_close(dx, ref_dx, TOL, "dx")
    for n in params:
        if ref_grads[n] is None:
            assert grads[n] is None, n
        else:
            assert_close(grads[n], ref_grads[n], TOL, n)


def test_layer_dropout_in_training_mode(llama, count_mixed):
    """Each adapter's rows get lorakern's seeded dropout (torch.manual_seed fixes the mask);
    "__base__" rows and rows of an adapter with p = 0 get the exact eval-mode output."""
    pm = _peft(llama, CONFIGS["llama"][:2], lora_dropout=0.0)
    layer = dict(_layers(pm))["base_model.model.model.layers.0.self_attn.q_proj"]
    layer.lora_dropout["one"] = nn.Dropout(0.5)
    lorakern.patch_peft(pm)
    torch.manual_seed(3)
    names = ["one", BASE, "two", "one"]
    x = torch.randn(len(names), 5, layer.in_features)
    with torch.no_grad():
        layer.eval()
        eval_y = layer(x, adapter_names=names)
        layer.train()
        torch.manual_seed(123)
        train_y = layer(x, adapter_names=names)
        torch.manual_seed(123)
        w = layer.base_layer.weight
        As = [layer.lora_A[n].weight for n in ("one", "two")]
        Bs = [layer.lora_B[n].weight for n in ("one", "two")]
        s = [layer.scaling[n] for n in ("one", "two")]
        direct = lorakern.lora_linear_mixed(x, w, None, As, Bs, s, [0, -1, 1, 0], dropout_ps=[0.5, 0.0])
    assert count_mixed == [[0, -1, 1, 0], [0, -1, 1, 0]]
    assert torch.equal(train_y, direct)
    assert torch.equal(train_y[1:3], eval_y[1:3])  # base row, and adapter "two" (p = 0)
    for row in (0, 3):
        assert rel_error(train_y[row], eval_y[row]) > 1e-3, f"row {row}: no dropout applied"


def test_bf16_base_with_fp32_adapters(llama):
    """bf16 base, fp32 adapters (PEFT's default): the patched mixed batch is as close to an fp64
    run as PEFT's own bf16 mixed batch (DESIGN.md §5)."""
    pm = _peft(copy.deepcopy(llama).to(torch.bfloat16), CONFIGS["llama"])
    ids = input_ids(batch=len(ROWS), seq=5, seed=12)
    with torch.no_grad():
        ref = pm(input_ids=ids, adapter_names=ROWS).logits
        exact = copy.deepcopy(pm).double()(input_ids=ids, adapter_names=ROWS).logits
        lorakern.patch_peft(pm)
        out = pm(input_ids=ids, adapter_names=ROWS).logits
    assert out.dtype == torch.bfloat16
    err, peft_err = rel_error(out, exact), rel_error(ref, exact)
    assert err <= RTOL[torch.bfloat16] and err <= 2 * peft_err, (err, peft_err)


# ---------------------------------------------------------------------------- fallbacks


class _ScaledDropout(nn.Module):
    """Not nn.Dropout: the op cannot reproduce it, PEFT's forward must run."""

    def forward(self, x):
        return 0.5 * x


def test_non_dropout_module_and_lora_bias_fall_back(llama, count_mixed):
    pm = _peft(llama, CONFIGS["llama"][:2])
    pm.add_adapter("tri", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], lora_bias=True,
                                          init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B.tri" in n and n.endswith("bias"):
                p.normal_()
    q0 = dict(_layers(pm))["base_model.model.model.layers.0.self_attn.q_proj"]
    q0.lora_dropout["one"] = _ScaledDropout()
    ids = input_ids(batch=len(ROWS), seq=5, seed=13)
    with torch.no_grad():
        ref = pm(input_ids=ids, adapter_names=ROWS).logits
        n = lorakern.patch_peft(pm)
        out = pm(input_ids=ids, adapter_names=ROWS).logits
        # every layer but q0 and the two v_proj layers (lora_bias adapter used) took the op
        assert len(count_mixed) == n - 3
        assert_close(out, ref, TOL, "logits with fallbacks")
        count_mixed.clear()
        pm(input_ids=ids, adapter_names=[BASE, "two", "two", BASE, "two", BASE, "two"])  # "one", "tri" unused
        assert len(count_mixed) == n


def test_disabled_merged_dora_and_bad_names_are_peft_s(llama, count_mixed):
    pm = _peft(llama, CONFIGS["llama"][:2])
    pm.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    pm.eval()
    n = lorakern.patch_peft(pm)
    ids = input_ids(batch=3, seq=4, seed=14)
    with torch.no_grad():
        with pm.disable_adapter():
            disabled = pm(input_ids=ids, adapter_names=["one", "two", BASE]).logits
            base_out = pm(input_ids=ids).logits
        assert count_mixed == []
        assert_close(disabled, base_out, TOL, "adapters disabled: the base model")
        # a DoRA adapter no row uses does not stop the others from taking the op
        pm(input_ids=ids, adapter_names=["one", "two", BASE])
        assert len(count_mixed) == n
        with pytest.raises(ValueError, match="DoRA"):
            pm(input_ids=ids, adapter_names=["one", "dora", BASE])
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            pm(input_ids=ids, adapter_names=["one", "two"])
        with pytest.raises(ValueError, match="non-existing adapter"):
            pm(input_ids=ids, adapter_names=["one", "typo", BASE])
        pm.base_model.set_adapter("one")
        pm.merge_adapter()
        count_mixed.clear()
        with pytest.raises(ValueError, match="merged"):
            pm(input_ids=ids, adapter_names=["one", "two", BASE])
        assert count_mixed == []
