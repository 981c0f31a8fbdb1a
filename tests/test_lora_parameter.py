"""LoRA on parameters (config.target_parameters, lorakern/parameter.py): mixture-of-experts
weights with one low-rank delta per expert, PEFT 0.21 as the oracle.

- the layer alone: per-expert W + s·B_e A_e in PEFT's layout, [E, in, out] experts, 2-D
  parameters, nesting, init and refusals;
- tiny Mixtral / Qwen3-MoE / gpt-oss models from configs: logits and every gradient equal
  PEFT's with the same weights, trainable counts, files both ways, merge / unmerge /
  unload, a second adapter, delete_adapter, and what is refused (mixed batches, combining,
  a different parameter set, dropout).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakern
from lorakern.model import lora_layers
from lorakern.parameter import LoraParameter
from tests.utils import assert_close

pytestmark = pytest.mark.usefixtures("quiet_warnings")

PREFIX = "base_model.model."


class Experts(nn.Module):
    """E experts stored as one parameter, each applied to its own rows."""

    def __init__(self, E=3, d_in=8, d_out=6, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        shape = (E, d_in, d_out) if transposed else (E, d_out, d_in)
        self.w = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(E, d_in, d_in, dtype=torch.float64))

    def forward(self, x, expert):
        w = self.w[expert]
        y = x @ w if self.is_transposed else x @ w.t()
        return y


# ---------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("transposed", [False, True])
def test_each_expert_gets_its_own_delta_in_peft_layout(transposed):
    torch.manual_seed(0)
    E, r, s = 3, 2, 0.75
    base = Experts(E, transposed=transposed)
    layer = LoraParameter(base, "w", r=r, lora_alpha=s * r, init_lora_weights=False)
    A, B = (t.detach() for t in layer.lora_weights("default"))
    assert A.shape == (r * E, 8) and B.shape == (6, r * E)
    x = torch.randn(5, 8, dtype=torch.float64)
    for e in range(E):
        A_e = A[e * r:(e + 1) * r]  # expert-major rows
        B_e = B[:, [j * E + e for j in range(r)]]  # rank-major columns
        W_e = base.w[e].t() if transposed else base.w[e]  # [out, in]
        ref = x @ (W_e + s * B_e @ A_e).t()
        assert_close(layer(x, e), ref, 1e-12, f"expert {e}")
    assert torch.equal(base(x, 1), x @ (base.w[1] if transposed else base.w[1].t()))  # the base is untouched


def test_two_d_parameter_is_a_plain_low_rank_delta_and_init_starts_at_zero():
    torch.manual_seed(1)
    lin = nn.Linear(8, 5, bias=False).double()
    layer = LoraParameter(lin, "weight", r=3, lora_alpha=6, init_lora_weights=False)
    A, B = layer.lora_weights("default")
    x = torch.randn(4, 8, dtype=torch.float64)
    assert_close(layer(x), x @ (lin.weight + 2.0 * B @ A).t(), 1e-12)
    zero = LoraParameter(nn.Linear(8, 5).double(), "weight", r=3)  # init True: B = 0
    assert torch.equal(zero(x), zero.base_layer(x))


def test_nested_parameters_and_gradients():
    torch.manual_seed(2)
    base = Experts(2)

    class Both(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    inner = LoraParameter(base, "w", r=2, lora_alpha=2, init_lora_weights=False)
    outer = LoraParameter(inner, "v", r=1, lora_alpha=3, init_lora_weights=False)
    assert outer.get_param() is base.v and inner.get_param() is base.w
    x = torch.randn(4, 8, dtype=torch.float64)
    y = outer(x, 1)
    assert_close(y, x @ inner.effective_weight(["default"])[1].t(), 1e-12)
    y.sum().backward()
    assert inner.lora_A["default"].weight.grad is not None and inner.lora_B["default"].weight.grad is not None
    assert base.w.grad is None and not base.w.requires_grad


@pytest.mark.parametrize("kw, match", [
    (dict(lora_dropout=0.1), "lora_dropout"), (dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias"),
])
def test_layer_refuses_what_peft_refuses(kw, match):
    with pytest.raises(ValueError, match=match):
        LoraParameter(Experts(), "w", r=2, **kw)


def test_layer_refuses_bad_parameters():
    with pytest.raises(TypeError, match="no parameter 'nope'"):
        LoraParameter(Experts(), "nope")
    m = nn.Module()
    m.b = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="2-D"):
        LoraParameter(m, "b")
    with pytest.raises(ValueError, match="mixed batches"):
        LoraParameter(Experts(), "w")(torch.randn(2, 8, dtype=torch.float64), 0, adapter_names=["default"] * 2)


# ---------------------------------------------------------------------------- models vs PEFT

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(3)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    return MixtralForCausalLM(cfg).eval()


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(4)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=12,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=32, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeForCausalLM(cfg).eval()


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(5)
    cfg = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=32, layer_types=["full_attention", "full_attention"])
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # the experts' biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("_proj_bias"):
                p.normal_(0, 0.5)
    return model


MODELS = {
    "mixtral": (_mixtral, ["gate_up_proj", "down_proj", "gate.weight"]),
    "qwen3_moe": (_qwen3_moe, ["experts.gate_up_proj", "experts.down_proj"]),
    "gpt_oss": (_gpt_oss, ["gate_up_proj", "down_proj"]),  # experts stored [E, in, out]
}


@pytest.fixture(scope="module", params=list(MODELS))
def moe(request):
    build, params = MODELS[request.param]
    return request.param, build(), params


def _config(params, **extra):
    return dict(dict(r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=params, init_lora_weights=False), **extra)


def _pair(base, kw):
    """PEFT and lorakern models with the same config and PEFT's (random) adapter values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**kw)).eval()
    theirs = {k.removeprefix(PREFIX): v for k, v in pm.state_dict().items()}
    assert theirs.keys() == model.state_dict().keys()
    model.load_state_dict(theirs)
    return pm, model


def _ids(seed=0):
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def _eager_experts(model):
    """fp64 needs transformers' plain expert loop (its default grouped_mm takes half and fp32 only)."""
    model = copy.deepcopy(model).double()
    model.config._experts_implementation = "eager"
    return model


def test_logits_gradients_and_counts_match_peft(moe):
    name, base, params = moe
    base = _eager_experts(base)
    pm, model = _pair(base, _config(params))
    assert lorakern.trainable_parameters(model) == pm.get_nb_trainable_parameters()
    assert any(isinstance(layer, LoraParameter) for _, layer in lora_layers(model))
    ids = _ids()
    ref, out = pm(input_ids=ids).logits, model(input_ids=ids).logits
    assert_close(out, ref, 1e-12, f"{name} logits")
    assert not torch.allclose(ref, base(input_ids=ids).logits)  # the adapters do something
    target = torch.randn_like(ref)
    ((ref - target) ** 2).mean().backward()
    ((out - target) ** 2).mean().backward()
    ours = dict(model.named_parameters())
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert any(".experts." in n for n, _ in trainable)
    for n, p in trainable:
        mine = ours[n.removeprefix(PREFIX)]
        assert mine.requires_grad and mine.grad is not None, n
        assert_close(mine.grad, p.grad, 1e-10, n)


def test_files_both_ways_and_merge_unload(moe, tmp_path):
    name, base, params = moe
    pm, model = _pair(base, _config(params))
    ids = _ids(1)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    lorakern.save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        pm.save_pretrained(tmp_path / "peft")
    loaded = lorakern.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        assert_close(theirs(input_ids=ids).logits, ref, 1e-6, "PEFT loads lorakern's file")
        assert_close(loaded(input_ids=ids).logits, ref, 1e-6, "lorakern loads PEFT's file")
        lorakern.merge(loaded)
        merged = loaded(input_ids=ids).logits
        lorakern.unmerge(loaded)
        unmerged = loaded(input_ids=ids).logits
        plain = lorakern.unload(copy.deepcopy(loaded), merge=False)
        folded = lorakern.unload(loaded, merge=True)
        assert_close(merged, ref, 1e-5, "merged")
        assert_close(unmerged, ref, 1e-5, "unmerged")
        assert_close(folded(input_ids=ids).logits, ref, 1e-5, "merge_and_unload")
        assert_close(plain(input_ids=ids).logits, base(input_ids=ids).logits, 1e-6, "unload")
    assert not any(isinstance(m, LoraParameter) for m in folded.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    for (n, p), (n0, p0) in zip(plain.state_dict().items(), base.state_dict().items()):
        assert n == n0
        assert_close(p, p0, 1e-6, n)


def test_second_adapter_switch_and_delete(moe):
    name, base, params = moe
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**_config(params)))
    lorakern.inject(model, lorakern.LoraConfig(**_config(params, r=1, lora_alpha=2)), adapter_name="other")
    ids = _ids(2)
    with torch.no_grad():
        first = model(input_ids=ids).logits
        lorakern.set_adapter(model, "other")
        second = model(input_ids=ids).logits
    assert not torch.allclose(first, second)
    for _, layer in lora_layers(model):
        assert layer.active_adapters == ["other"]
        assert not any(p.requires_grad for p in layer.adapter_parameters("default"))
    lorakern.delete_adapter(model, "other")
    lorakern.delete_adapter(model, "default")
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_refusals_leave_the_model_unchanged(moe):
    name, base, params = moe
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**_config(params)))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="target_parameters"):
        with lorakern.mixed_batch(model, ["default", "__base__"]):
            pass
    with pytest.raises(ValueError, match="target_parameters"):
        lorakern.add_weighted_adapter(model, ["default"], [1.0], "sum", combination_type="svd")
    with pytest.raises(ValueError, match="same parameters"):
        lorakern.inject(model, lorakern.LoraConfig(**_config(params[:1])), adapter_name="fewer")
    with pytest.raises(ValueError, match="lora_dropout"):
        lorakern.inject(model, lorakern.LoraConfig(**_config(params, lora_dropout=0.1)), adapter_name="drop")
    with pytest.raises(ValueError, match="no parameter"):
        lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(target_parameters=["nothing_here"]))
    assert {k: v for k, v in model.state_dict().items()}.keys() == snapshot.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_config_round_trips_through_peft_dicts():
    cfg = lorakern.LoraConfig(r=4, target_parameters=["down_proj", "gate_up_proj"])
    d = cfg.to_peft_dict()
    assert d["target_parameters"] == ["down_proj", "gate_up_proj"]
    assert lorakern.LoraConfig.from_peft_dict(d).target_parameters == ["down_proj", "gate_up_proj"]
    peft_cfg = peft.LoraConfig(**{k: v for k, v in d.items() if k in peft.LoraConfig.__dataclass_fields__})
    assert sorted(peft_cfg.target_parameters) == ["down_proj", "gate_up_proj"]
    with pytest.raises(TypeError, match="target_parameters"):
        lorakern.LoraConfig(target_parameters="down_proj")


# ---------------------------------------------------------------------------- PEFT's MoE rewrite


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "w1", "w3", "w2"], r".*(q_proj|w1|w3)", r".*\.(q_proj|w2|gate)"],
                         ids=["all-linear", "v4-list", "regex", "regex-router"])
def test_transformers5_moe_rewrite_matches_peft(targets):
    """PEFT rewrites old Mixtral names (w1/w3/w2, the router "gate") and "all-linear" into
    target_parameters with doubled rank / alpha for the fused gate_up_proj: the same
    config, parameters and logits here."""
    base = _mixtral()
    kw = dict(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False)
    pm, model = _pair(base, kw)
    assert lorakern.trainable_parameters(model) == pm.get_nb_trainable_parameters()
    theirs, ours = pm.peft_config["default"], lorakern.model.adapter_configs(model)["default"]
    assert sorted(theirs.target_modules) == ours.target_modules
    assert sorted(theirs.target_parameters) == ours.target_parameters
    assert theirs.rank_pattern == ours.rank_pattern and theirs.alpha_pattern == ours.alpha_pattern
    ids = _ids(4)
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, pm(input_ids=ids).logits, 1e-6, f"{targets}")


def test_transformers5_moe_rewrite_refuses_half_a_fused_pair_and_leaves_other_models_alone():
    with pytest.raises(ValueError, match="fused into 'gate_up_proj'"):
        lorakern.inject(_mixtral(), lorakern.LoraConfig(target_modules=["q_proj", "w1"]))
    from lorakern.moe_targets import convert_moe_config

    cfg = lorakern.LoraConfig(target_modules=["w1", "w3"])
    assert convert_moe_config(cfg, nn.Sequential(nn.Linear(2, 2))) is cfg  # not a transformers MoE model
    llama_like = _qwen3_moe()
    llama_like.config.model_type = "llama"
    assert convert_moe_config(cfg, llama_like) is cfg


# ---------------------------------------------------------------------------- the grouped path


def _grouped_calls(monkeypatch):
    from lorakern import experts

    calls = []
    original = experts.forward
    monkeypatch.setattr(experts, "forward", lambda *a, **k: calls.append(sorted(a[4])) or original(*a, **k))
    return calls


@pytest.mark.parametrize("two_adapters", [False, True], ids=["one", "two-active"])
def test_grouped_path_matches_the_reference_path(moe, two_adapters, monkeypatch):
    """The LoRA terms on each expert's rows (lorakern/experts.py) against W + ΔW rebuilt
    (PEFT's way, LoraParameter.grouped = False), fp32: outputs and every gradient."""
    name, base, params = moe
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**_config(params)))
    if two_adapters:
        lorakern.inject(model, lorakern.LoraConfig(**_config(params, r=3, lora_alpha=2)), adapter_name="other")
        lorakern.set_adapter(model, ["default", "other"])
    calls = _grouped_calls(monkeypatch)
    ids = _ids(5)
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(LoraParameter, "grouped", grouped)
        model.zero_grad()
        out = model(input_ids=ids).logits
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    expert_params = {p.split(".")[-1] for p in params if p.split(".")[-1] != "weight"}
    assert calls and all(sorted(c) == sorted(expert_params) for c in calls)  # one call per block, all projections
    (y_g, g_g), (y_r, g_r) = results
    assert_close(y_g, y_r, 1e-5, f"{name} logits")
    assert g_g.keys() == g_r.keys() and any(".experts." in n for n in g_g)
    for n in g_g:
        assert_close(g_g[n], g_r[n], 1e-4, n)


def test_grouped_path_is_left_for_what_it_does_not_cover(monkeypatch):
    calls = _grouped_calls(monkeypatch)
    base = _mixtral()
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**_config(["gate_up_proj", "down_proj"])))
    ids = _ids(6)
    with torch.no_grad():
        model(input_ids=ids)
        assert len(calls) == 2  # one per layer
        lorakern.merge(model)
        model(input_ids=ids)
        lorakern.unmerge(model)
        with lorakern.disable_adapters(model):
            model(input_ids=ids)
        _eager_experts(model)(input_ids=ids)  # fp64: grouped GEMMs do not take it
    assert len(calls) == 2


def _v4_adapter(path, model, container_v4, olds, router, r=2, alpha=4, seed=0):
    """A transformers-4 style adapter for `model`: one LoRA per expert and old projection
    name (and the router as a Linear), as PEFT saved them before transformers 5."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        E, H = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
        inter = experts.down_proj.shape[2]
        for e in range(E):
            for old in olds:
                d_in, d_out = (inter, H) if old in ("w2", "down_proj") else (H, inter)
                key = f"{PREFIX}model.layers.{i}.{container_v4}.experts.{e}.{old}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
                tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.1
        if router:
            key = f"{PREFIX}model.layers.{i}.{container_v4}.gate"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, H, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(E, r, generator=g) * 0.1
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    targets = list(olds) + (["gate"] if router else [])
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "task_type": "CAUSAL_LM"}))


@pytest.mark.parametrize("case", ["mixtral", "mixtral-router", "qwen3_moe"])
def test_transformers4_moe_adapter_files_load_as_peft_converts_them(case, tmp_path):
    """A per-expert adapter file from transformers 4 (w1/w3/w2 on Mixtral, gate_proj/up_proj/
    down_proj on Qwen-MoE, the router as a Linear) loads into the fused expert parameters as
    PEFT converts it: PEFT's logits, and the saved file is PEFT's transformers-5 format."""
    if case.startswith("mixtral"):
        base, container, olds = _mixtral(), "block_sparse_moe", ["w1", "w3", "w2"]
    else:
        base, container, olds = _qwen3_moe(), "mlp", ["gate_proj", "up_proj", "down_proj"]
    _v4_adapter(tmp_path / "v4", base, container, olds, router=case != "mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "v4").eval()
    ours = lorakern.load_adapter(copy.deepcopy(base), tmp_path / "v4").eval()
    ids = _ids(7)
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert not torch.allclose(want, base(input_ids=ids).logits)
        assert_close(ours(input_ids=ids).logits, want, 1e-6, case)
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    peft_sd = {k.removeprefix(PREFIX).replace(".default.", "."): v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert {k.replace(".default.", "."): None for k in mine}.keys() == peft_sd.keys()
    for k, v in mine.items():
        assert torch.equal(v, peft_sd[k.replace(".default.", ".")]), k
    lorakern.save_adapter(ours, tmp_path / "v5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "v5").eval()
    with torch.no_grad():
        assert_close(again(input_ids=ids).logits, want, 1e-6, "PEFT loads the converted file")


def test_transformers4_moe_file_missing_an_expert_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = _mixtral()
    _v4_adapter(tmp_path / "v4", base, "block_sparse_moe", ["w1", "w3", "w2"], router=False)
    tensors = load_file(tmp_path / "v4" / "adapter_model.safetensors")
    del tensors[f"{PREFIX}model.layers.0.block_sparse_moe.experts.3.w3.lora_B.weight"]
    save_file(tensors, tmp_path / "v4" / "adapter_model.safetensors")
    model = copy.deepcopy(base)
    # the fused parameter's keys are missing, the incomplete per-expert keys unexpected
    with pytest.raises(lorakern.adapters.AdapterLoadError, match=r"missing keys .*experts\.base_layer\.lora_A.*unexpected keys .*block_sparse_moe\.experts"):
        lorakern.load_adapter(model, tmp_path / "v4")
    assert not any("lora_" in k for k in model.state_dict())


def test_disable_adapters_after_merge_runs_the_base(moe):
    """As every LoRA layer (and PEFT's ParamWrapper): a merged layer is unmerged when it runs
    with adapters disabled, so disable_adapters gives the base model."""
    name, base, params = moe
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**_config(params)))
    ids = _ids(8)
    with torch.no_grad():
        want = base(input_ids=ids).logits
        lorakern.merge(model)
        with lorakern.disable_adapters(model):
            assert_close(model(input_ids=ids).logits, want, 1e-6, name)
