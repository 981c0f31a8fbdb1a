"""Interop with the real PEFT library, both ways, on tiny models built from configs.

- adapters trained and saved by PEFT load in lorakern and give the same logits;
- adapters trained and saved by lorakern load with PeftModel.from_pretrained and give
  the same logits;
- target matching, trainable parameters, add_weighted_adapter and merge agree with PEFT;
- patch_peft gives PEFT's logits and gradients.
Comparisons are fp32 at RTOL[float32] (the math is the same; differences are rounding).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import lorakern
from lorakern.model import lora_layers
from tests.test_model_helpers import input_ids, logits, tiny_gpt2, train_steps
from tests.utils import RTOL, assert_close

pytestmark = pytest.mark.usefixtures("quiet_warnings")

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

TOL = RTOL[torch.float32]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def ids():
    return input_ids()


# Each case: (model fixture name, config kwargs shared by both libraries).
CASES = {
    "llama-patterns-mts": (
        "llama",
        dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"layers.1.self_attn.q_proj": 3, "down_proj": 12},
            modules_to_save=["lm_head"],
        ),
    ),
    "llama-rslora-regex": (
        "llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=r".*\.(k_proj|up_proj)"),
    ),
    "llama-layers": (
        "llama", dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj"], layers_to_transform=[1], layers_pattern="layers"),
    ),
    "gpt2-conv1d-bias-all-mts": (
        "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="all", modules_to_save=["ln_f"]),
    ),
    "llama-exclude-gaussian": (
        "llama", dict(r=4, target_modules=r".*_proj", exclude_modules=["o_proj", "model.layers.0.mlp.up_proj"], init_lora_weights="gaussian"),
    ),
    "llama-all-linear-dropout": ("llama", dict(r=2, lora_alpha=4, lora_dropout=0.1, target_modules="all-linear")),
    "gpt2-lora-only": (
        "gpt2", dict(r=3, lora_alpha=5, target_modules=["c_proj"], fan_in_fan_out=True, bias="lora_only"),
    ),
}


def _peft_model(base, kwargs, adapter_name="default"):
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs), adapter_name=adapter_name)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_adapter_loads_in_lorakern(case, request, ids, tmp_path):
    fixture, kwargs = CASES[case]
    base = request.getfixturevalue(fixture)
    pm = _peft_model(base, kwargs)
    train_steps(pm, ids)
    pm.save_pretrained(tmp_path)
    ref = logits(pm, ids)
    assert not torch.allclose(ref, logits(base, ids)), "training did not move the adapter"

    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path)
    assert_close(logits(model, ids), ref, TOL, "logits")
    # Same modules got adapters, with the same ranks and scalings.
    ours = {n: (layer.r["default"], layer.scaling["default"]) for n, layer in lora_layers(model)}
    theirs = {
        n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name][0] == theirs[name][0], name
        assert ours[name][1] == pytest.approx(theirs[name][1], rel=1e-12), name


@pytest.mark.parametrize("case", list(CASES))
def test_lorakern_saved_adapter_loads_in_peft(case, request, ids, tmp_path):
    fixture, kwargs = CASES[case]
    base = request.getfixturevalue(fixture)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**kwargs))
    train_steps(model, ids)
    ref = logits(model, ids)
    assert not torch.allclose(ref, logits(base, ids))
    lorakern.save_adapter(model, tmp_path)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert_close(logits(pm, ids), ref, TOL, "logits")


def test_second_named_adapter_both_ways(llama, ids, tmp_path):
    """PEFT trains two named adapters; lorakern loads both and runs them together (summed),
    and a lorakern-saved second adapter loads into PEFT under its name."""
    k1 = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    k2 = dict(r=2, lora_alpha=6, target_modules=["v_proj", "o_proj"])
    pm = _peft_model(llama, k1)
    pm.add_adapter("other", peft.LoraConfig(**k2))
    train_steps(pm, ids)
    pm.set_adapter("other")
    train_steps(pm, ids)
    pm.save_pretrained(tmp_path / "peft")  # "other" goes to the subfolder "other"
    pm.base_model.set_adapter(["default", "other"])
    ref_both = logits(pm, ids)

    model = lorakern.load_adapter(copy.deepcopy(llama), tmp_path / "peft")
    lorakern.load_adapter(model, tmp_path / "peft" / "other", adapter_name="other")
    lorakern.set_adapter(model, ["default", "other"])
    assert_close(logits(model, ids), ref_both, TOL, "both adapters")
    lorakern.set_adapter(model, "other")
    pm.set_adapter("other")
    assert_close(logits(model, ids), logits(pm, ids), TOL, "second adapter alone")

    lorakern.save_adapter(model, tmp_path / "lk_other", adapter_name="other")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "lk_other", adapter_name="other")
    assert_close(logits(pm2, ids), logits(model, ids), TOL, "lorakern-saved second adapter in PEFT")


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_parameters_match_peft(case, request, capsys):
    fixture, kwargs = CASES[case]
    base = request.getfixturevalue(fixture)
    pm = _peft_model(base, kwargs)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**kwargs))
    theirs = {n.removeprefix(PREFIX) for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ours == theirs
    assert lorakern.trainable_parameters(model) == pm.get_nb_trainable_parameters()
    pm.print_trainable_parameters()
    lorakern.print_trainable_parameters(model)
    peft_line, our_line = capsys.readouterr().out.strip().splitlines()
    assert our_line == peft_line


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_all_linear_matches_peft(fixture, request):
    base = request.getfixturevalue(fixture)
    pm = _peft_model(base, dict(r=2, target_modules="all-linear"))
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = {n for n, _ in lora_layers(model)}
    assert ours == theirs
    assert "lm_head" not in ours


# Names chosen to trip naive matching: suffix vs substring, nested indices, regex anchors.
TRICKY_NAMES = [
    "q_proj", "proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.xq_proj",
    "model.layers.12.self_attn.k_proj", "model.layers.1.mlp.experts.0.down_proj",
    "model.layers.3.mlp.experts.1.down_proj", "transformer.h.2.attn.c_attn", "model.decoder.layers.1.fc1",
    "encoder.block.1.layer.0.SelfAttention.q", "lm_head", "model.layers.1.self_attn.q_proj.extra",
]
TRICKY_CONFIGS = [
    dict(target_modules=["proj"]),
    dict(target_modules=["q_proj", "down_proj"]),
    dict(target_modules=["self_attn.q_proj"]),
    dict(target_modules=r".*\.(q|k)_proj"),
    dict(target_modules="q_proj"),
    dict(target_modules=["q_proj", "k_proj", "down_proj", "c_attn"], layers_to_transform=[1, 2]),
    dict(target_modules=["q_proj", "k_proj", "down_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["down_proj"], layers_to_transform=[0], layers_pattern=["experts", "layers"]),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    dict(target_modules=r".*proj", exclude_modules=r".*layers\.1.*"),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
]


@pytest.mark.parametrize("kwargs", TRICKY_CONFIGS, ids=[str(i) for i in range(len(TRICKY_CONFIGS))])
def test_target_matching_agrees_with_peft(kwargs):
    from peft.tuners.tuners_utils import check_target_module_exists

    ours = lorakern.LoraConfig(**kwargs)
    theirs = peft.LoraConfig(**kwargs)
    for name in TRICKY_NAMES:
        expected = bool(check_target_module_exists(theirs, name)) and not type(
            check_target_module_exists(theirs, name)
        ).__name__.startswith("_Excluded")
        assert ours.matches(name) == expected, f"{name!r} with {kwargs}"


def test_proj_does_not_match_q_proj():
    cfg = lorakern.LoraConfig(target_modules=["proj"])
    assert not cfg.matches("model.layers.0.self_attn.q_proj")
    assert cfg.matches("model.layers.0.proj")


@pytest.mark.parametrize("name", TRICKY_NAMES)
def test_rank_and_alpha_patterns_agree_with_peft(name):
    from peft.utils.other import get_pattern_key

    rank_pattern = {"q_proj": 3, r"layers\.1\..*": 5, "proj": 7, r"experts\.\d+\.down_proj": 9}
    alpha_pattern = {"down_proj": 11, "q": 13}
    cfg = lorakern.LoraConfig(r=2, lora_alpha=4, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    r_key = get_pattern_key(rank_pattern.keys(), name)
    a_key = get_pattern_key(alpha_pattern.keys(), name)
    assert cfg.rank_for(name) == rank_pattern.get(r_key, 2)
    assert cfg.alpha_for(name) == alpha_pattern.get(a_key, 4)


# ---------------------------------------------------------------------------- combine, merge


def _two_adapter_models(base, ids, tmp_path):
    """The same two trained adapters in PEFT and in lorakern."""
    k1 = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    k2 = dict(r=4, lora_alpha=4, target_modules=["v_proj", "o_proj"])
    pm = _peft_model(base, k1)
    pm.add_adapter("b", peft.LoraConfig(**k2))
    train_steps(pm, ids, steps=2)
    pm.set_adapter("b")
    train_steps(pm, ids, steps=2)
    pm.set_adapter("default")
    pm.save_pretrained(tmp_path)
    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    lorakern.load_adapter(model, tmp_path / "b", adapter_name="b", is_trainable=True)
    return pm, model


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(combination_type, llama, ids, tmp_path):
    pm, model = _two_adapter_models(llama, ids, tmp_path)
    weights = [0.7, -1.3]
    pm.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination_type)
    lorakern.add_weighted_adapter(model, ["default", "b"], weights, "mix", combination_type=combination_type)
    peft_layers = {n.removeprefix(PREFIX): m for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    checked = 0
    for name, layer in lora_layers(model):
        assert ("mix" in layer.lora_A) == ("mix" in peft_layers[name].lora_A), name
        if "mix" not in layer.lora_A:
            continue
        theirs = peft_layers[name].get_delta_weight("mix")
        assert_close(layer.get_delta_weight("mix"), theirs, TOL, f"{name} delta")
        checked += 1
    assert checked == 6  # q, v, o in two layers
    pm.set_adapter("mix")
    lorakern.set_adapter(model, "mix")
    assert_close(logits(model, ids), logits(pm, ids), TOL, "logits with the combined adapter")


def test_merged_weights_match_peft(gpt2, ids):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    pm = _peft_model(gpt2, kwargs)
    model = lorakern.inject(copy.deepcopy(gpt2), lorakern.LoraConfig(**kwargs))
    # Give lorakern PEFT's (random) adapter weights.
    model.load_state_dict({n.removeprefix(PREFIX): p for n, p in pm.state_dict().items()})
    merged_peft = pm.merge_and_unload()
    merged_ours = lorakern.unload(model, merge=True)
    sd_theirs, sd_ours = merged_peft.state_dict(), merged_ours.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for k in sd_ours:
        assert_close(sd_ours[k], sd_theirs[k], TOL, k)


# ----------------------------------------------------------------------------- patch_peft


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_patch_peft_same_logits_and_grads(fixture, request, ids):
    base = request.getfixturevalue(fixture)
    target = ["q_proj", "v_proj", "down_proj"] if fixture == "llama" else ["c_attn", "c_fc"]
    pm = _peft_model(base, dict(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False, bias="lora_only"))
    pm.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=3, target_modules=target[:1], init_lora_weights=False))
    pm.base_model.set_adapter(["default", "two"])  # both active (and trainable)
    pm.train()

    def run():
        pm.zero_grad(set_to_none=True)
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), _grads(pm)

    ref_logits, ref_grads = run()
    params_before = {n: p for n, p in pm.named_parameters()}
    calls = []
    import lorakern.layer as layer_mod

    real = layer_mod.lora_linear
    layer_mod.lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        n = lorakern.patch_peft(pm)
        out_logits, grads = run()
    finally:
        layer_mod.lora_linear = real
    assert n == (6 if fixture == "llama" else 4)
    assert len(calls) == n, "one fused op call per patched layer (both adapters in one launch)"
    assert {k: v for k, v in pm.named_parameters()} == params_before  # same Parameter objects: nothing copied
    assert_close(out_logits, ref_logits, TOL, "patched logits")
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert_close(grads[k], ref_grads[k], TOL, f"grad {k}")

    assert lorakern.unpatch_peft(pm) == n
    assert all("forward" not in vars(m) for m in pm.modules())
    again_logits, _ = run()
    assert torch.equal(again_logits, ref_logits)


def test_patch_peft_falls_back_when_disabled_or_merged(llama, ids):
    pm = _peft_model(llama, dict(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.eval()
    lorakern.patch_peft(pm)
    import lorakern.layer as layer_mod

    calls = []
    real = layer_mod.lora_linear
    layer_mod.lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with pm.disable_adapter():
            assert_close(logits(pm, ids), logits(llama, ids), TOL, "disabled")
        assert calls == []
        with_adapter = logits(pm, ids)
        assert len(calls) == 2
        pm.merge_adapter()
        assert_close(logits(pm, ids), with_adapter, TOL, "merged")
        assert len(calls) == 2
    finally:
        layer_mod.lora_linear = real


def test_patch_peft_needs_lora_layers(llama):
    with pytest.raises(ValueError, match="no PEFT LoRA Linear"):
        lorakern.patch_peft(copy.deepcopy(llama))


def test_config_json_keys_are_peft_keys(llama, tmp_path):
    """Every key lorakern writes is a field PEFT's LoraConfig knows (PEFT warns on unknown ones)."""
    import dataclasses
    import json

    model = lorakern.inject(copy.deepcopy(llama), lorakern.LoraConfig(target_modules=["q_proj"]))
    lorakern.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert set(written) - known == set()
    assert written["peft_type"] == "LORA"
    assert not any(re.search("scaling", k) for k in written)


def test_patch_peft_bf16_model_with_fp32_adapters(llama, ids):
    """bf16 base, fp32 adapters (PEFT's default): the patched model is as close to an fp64
    run of the same PEFT model as PEFT's own bf16 forward is (DESIGN.md §5: within the
    dtype's tolerance and no worse than 2x PyTorch's own error)."""
    from tests.utils import rel_error

    pm = _peft_model(copy.deepcopy(llama).to(torch.bfloat16), dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ref = logits(pm, ids)
    exact = logits(copy.deepcopy(pm).double(), ids)
    lorakern.patch_peft(pm)
    out = logits(pm, ids)
    assert out.dtype == torch.bfloat16
    err, peft_err = rel_error(out, exact), rel_error(ref, exact)
    assert err <= RTOL[torch.bfloat16] and err <= 2 * peft_err, (err, peft_err)
