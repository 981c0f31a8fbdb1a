"""Model-level LoRA: config validation, injection, several adapters, combine, merge/unload."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lorakern
import lorakern.layer as layer_mod
from lorakern import LoraConfig, LoraLinear
from lorakern.layer import lora_linear_multi
from lorakern.model import ModulesToSave, active_adapters, lora_layers, saved_modules
from tests.test_model_helpers import full_state, input_ids, logits, tiny_mlp
from tests.conftest import KERNEL_DEVICE, requires_triton
from tests.utils import RTOL, assert_close

pytestmark = pytest.mark.usefixtures("quiet_warnings")

TOL = RTOL[torch.float32]


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the fused op made by LoraLinear."""
    calls = []
    real = layer_mod.lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dropout_p"))
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_mod, "lora_linear", counting)
    return calls


def randomize_adapters(model, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B):
                for m in d.values():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * scale)


# ---------------------------------------------------------------------------- LoraConfig


def test_config_defaults_are_peft_defaults():
    cfg = LoraConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias, cfg.use_rslora) == (8, 8, 0.0, "none", False)
    assert cfg.target_modules is None and cfg.exclude_modules is None and cfg.modules_to_save is None
    assert cfg.init_lora_weights is True and cfg.fan_in_fan_out is False
    assert cfg.layers_to_transform is None and cfg.layers_pattern is None
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be an int >= 1"),
        (dict(r=2.5), "r must be an int >= 1"),
        (dict(bias="some"), "bias must be one of"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_alpha=float("nan")), "lora_alpha"),
        (dict(target_modules=r".*q_proj", layers_to_transform=[0]), "layers_to_transform cannot be used"),
        (dict(target_modules="all-linear", layers_pattern="layers", layers_to_transform=0), "cannot be used"),
        (dict(target_modules=["q"], layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
        (dict(target_modules="(unclosed"), "not a valid regex"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(alpha_pattern={"q_proj": float("inf")}), "alpha_pattern"),
        (dict(init_lora_weights="pissa"), "init_lora_weights"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("layers_to_transform", [None, [], [0], 1], ids=["none", "empty", "list", "int"])
def test_layers_pattern_needs_layers_to_transform_as_peft(layers_to_transform):
    # PEFT refuses only layers_to_transform=None with a layers_pattern; [] is accepted and
    # selects every layer. lorakern must accept and refuse exactly the same configs.
    peft = pytest.importorskip("peft")
    kwargs = dict(target_modules=["up"], layers_pattern="blocks", layers_to_transform=layers_to_transform)
    try:
        peft.LoraConfig(**kwargs)
        peft_raises = False
    except ValueError:
        peft_raises = True
    if peft_raises:
        with pytest.raises(ValueError, match="layers_pattern needs layers_to_transform"):
            LoraConfig(**kwargs)
    else:
        LoraConfig(**kwargs)
    assert peft_raises == (layers_to_transform is None)


def test_layers_pattern_with_empty_layers_to_transform_targets_every_layer():
    model = lorakern.inject(tiny_mlp(), LoraConfig(target_modules=["up"], layers_pattern="blocks", layers_to_transform=[]))
    assert {n for n, _ in lora_layers(model)} == {f"blocks.{i}.up" for i in range(3)}


def test_default_target_modules_match_peft():
    # lorakern copies PEFT's table (PEFT is optional at runtime); every entry must agree.
    constants = pytest.importorskip("peft.utils.constants")
    peft_table = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for model_type, targets in lorakern.config.DEFAULT_TARGET_MODULES.items():
        assert model_type in peft_table, f"{model_type!r} has no PEFT default"
        assert targets == peft_table[model_type], f"default targets for {model_type!r}"


def test_config_type_errors():
    with pytest.raises(TypeError, match="target_modules"):
        LoraConfig(target_modules=[1, 2])
    with pytest.raises(TypeError, match="layers_to_transform"):
        LoraConfig(target_modules=["q"], layers_to_transform=["0"])


def test_patterns_first_match_wins_and_scaling():
    cfg = LoraConfig(r=4, lora_alpha=8, rank_pattern={r"layers\.0\..*": 2, "q_proj": 16}, alpha_pattern={"q_proj": 32})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2  # first key in order wins
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 16
    assert cfg.rank_for("model.layers.1.self_attn.xq_proj") == 4
    assert cfg.scaling_for("model.layers.1.self_attn.q_proj") == 32 / 16
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling_for("a.b") == pytest.approx(8 / 4)


# ------------------------------------------------------------------------------- inject


def test_inject_mlp_replaces_only_targets_and_freezes_base():
    model = tiny_mlp()
    base_out = model(torch.randn(3, 16))
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    ref = model(x)
    names_before = {n for n, p in model.named_parameters()}
    out = lorakern.inject(model, LoraConfig(r=4, target_modules=["up"], layers_to_transform=[0, 2], layers_pattern="blocks"))
    assert out is model
    assert {n for n, _ in lora_layers(model)} == {"blocks.0.up", "blocks.2.up"}
    assert isinstance(model.blocks[1]["up"], nn.Linear) and not isinstance(model.blocks[1]["up"], LoraLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.up.lora_{ab}.default.weight" for i in (0, 2) for ab in "AB"}
    # Base parameters are reused (renamed under base_layer), not copied, and frozen.
    assert {n.replace("base_layer.", "") for n, p in model.named_parameters() if "lora_" not in n} == names_before
    assert_close(model(x), ref, TOL, "identity at init (B = 0)")
    assert base_out.shape == (3, 5)
    assert lorakern.trainable_parameters(model) == (2 * (4 * 16 + 24 * 4), sum(p.numel() for p in model.parameters()))


def test_inject_no_match_lists_module_names(llama):
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        lorakern.inject(copy.deepcopy(llama), LoraConfig(target_modules=["query"]))


def test_inject_rejects_unsupported_module(llama):
    with pytest.raises(TypeError, match="LlamaMLP"):
        lorakern.inject(copy.deepcopy(llama), LoraConfig(target_modules=["mlp"]))


def test_inject_default_targets_from_model_type(llama):
    model = lorakern.inject(copy.deepcopy(llama), LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)} == {"q_proj", "v_proj"}
    assert lorakern.model.adapter_configs(model)["default"].target_modules == ["q_proj", "v_proj"]


def test_inject_same_name_twice_raises():
    model = lorakern.inject(tiny_mlp(), LoraConfig(target_modules=["up"]))
    with pytest.raises(ValueError, match="already exists"):
        lorakern.inject(model, LoraConfig(target_modules=["down"]))


def test_modules_to_save_trainable_copy_and_restorable():
    model = tiny_mlp()
    head_w = model.head.weight.detach().clone()
    lorakern.inject(model, LoraConfig(target_modules=["up"], modules_to_save=["head"]))
    assert isinstance(model.head, ModulesToSave)
    copy_ = model.head.modules_to_save["default"]
    assert copy_.weight.requires_grad and not model.head.original_module.weight.requires_grad
    assert copy_.weight.data_ptr() != model.head.original_module.weight.data_ptr()
    assert model.head.weight is copy_.weight  # attribute passthrough to the module in use
    with torch.no_grad():
        copy_.weight.add_(1.0)
    x = torch.randn(2, 16)
    y_trained = model(x)
    with lorakern.disable_adapters(model):
        y_base = model(x)
    assert not torch.allclose(y_trained, y_base)
    assert torch.equal(model.head.original_module.weight, head_w), "the original is kept unchanged"
    trained_w = copy_.weight.detach().clone()
    lorakern.unload(model, merge=False)
    # As PEFT's unload: the active adapter's trained copy stays (tests/test_model_semantics.py).
    assert isinstance(model.head, nn.Linear) and torch.equal(model.head.weight, trained_w)
    assert_close(model(x), y_trained, TOL, "trained head kept")


@pytest.mark.parametrize("bias, expected", [
    ("none", set()),
    ("lora_only", {"blocks.0.up.base_layer.bias", "blocks.1.up.base_layer.bias", "blocks.2.up.base_layer.bias"}),
    ("all", {f"blocks.{i}.up.base_layer.bias" for i in range(3)} | {f"blocks.{i}.down.bias" for i in range(3)} | {"head.bias"}),
])
def test_bias_trainability(bias, expected):
    model = lorakern.inject(tiny_mlp(), LoraConfig(target_modules=["up"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == expected


class _BiasNamesModel(nn.Module):
    """A Linear with a bias next to an embedding whose name contains "bias" (as T5's)."""

    def __init__(self):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(4, 2)
        self.q = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)


def test_bias_all_selects_parameters_named_bias_only():
    model = lorakern.inject(_BiasNamesModel(), LoraConfig(target_modules=["q"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"q.base_layer.bias", "o.bias"}
    assert not model.relative_attention_bias.weight.requires_grad


class _ProjModel(nn.Module):
    """attn.{q_proj, v_proj} and a top-level proj: "proj" is a suffix of q_proj's name."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8)})
        self.proj = nn.Linear(8, 8)


def test_target_also_in_modules_to_save_raises_and_changes_nothing():
    # modules_to_save=["proj"] does not exclude q_proj from targeting (whole-component rule)
    # but does wrap it (suffix rule), as in PEFT, which then raises; lorakern must not drop
    # the LoRA layer by wrapping the plain Linear.
    model = _ProjModel()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"'attn\.q_proj' is a LoRA target and is also in modules_to_save"):
        lorakern.inject(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["proj"]))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert not hasattr(model, "_lorakern")


def test_target_inside_modules_to_save_raises():
    # "ttn" wraps attn by suffix but does not exclude attn.q_proj from targeting.
    with pytest.raises(ValueError, match=r"'attn\.q_proj' .* inside the modules_to_save module 'attn'"):
        lorakern.inject(_ProjModel(), LoraConfig(target_modules=["q_proj"], modules_to_save=["ttn"]))


def test_modules_to_save_excluding_a_whole_component_keeps_other_targets():
    # A module_to_save that is a whole dotted component is excluded from targeting, so
    # "all-linear" puts LoRA everywhere else and wraps attn.v_proj, without raising.
    model = lorakern.inject(_ProjModel(), LoraConfig(target_modules="all-linear", modules_to_save=["v_proj"]))
    assert {n for n, _ in lora_layers(model)} == {"attn.q_proj", "proj"}
    assert [n for n, _ in saved_modules(model)] == ["attn.v_proj"]


# ------------------------------------------------------------------------------ Conv1D


def test_conv1d_layer_uses_weight_view_and_matches_naive(gpt2):
    conv = copy.deepcopy(gpt2.transformer.h[0].attn.c_attn)  # weight [64, 192] = [in, out]
    ptr = conv.weight.data_ptr()
    layer = LoraLinear(conv, r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True)
    assert layer.base_layer.weight.data_ptr() == ptr and (layer.in_features, layer.out_features) == (64, 192)
    assert layer.base_weight().data_ptr() == ptr  # a transposed view, not a copy
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x64 = x.detach().double().requires_grad_(True)
    A64, B64 = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    ref = x64 @ conv.weight.double() + conv.bias.double() + 2.0 * (x64 @ A64.t()) @ B64.t()
    assert_close(y, ref, TOL, "y")
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    assert_close(x.grad, x64.grad, TOL, "dx")
    assert_close(A.grad, A64.grad, TOL, "dA")
    assert_close(B.grad, B64.grad, TOL, "dB")


def test_conv1d_merge_unmerge(gpt2):
    model = lorakern.inject(copy.deepcopy(gpt2), LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    randomize_adapters(model)
    ids = input_ids()
    before = logits(model, ids)
    w0 = model.transformer.h[0].attn.c_attn.base_layer.weight.detach().clone()
    lorakern.merge(model)
    assert_close(logits(model, ids), before, TOL, "merged logits")
    lorakern.unmerge(model)
    assert_close(model.transformer.h[0].attn.c_attn.base_layer.weight, w0, 1e-6, "unmerged weight")


# ---------------------------------------------------------------------- several adapters


def _naive_multi(layer: LoraLinear, x: torch.Tensor, names) -> torch.Tensor:
    x = x.double()
    y = x @ layer.base_weight().double().t()
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.double()
    for n in names:
        y = y + layer.scaling[n] * (x @ layer.lora_A[n].weight.double().t()) @ layer.lora_B[n].weight.double().t()
    return y


def test_two_active_adapters_one_fused_call_values_and_grads(op_calls):
    layer = LoraLinear(nn.Linear(20, 12), r=3, lora_alpha=6, init_lora_weights=False)
    layer.update_layer("b", 5, 2.5, init_lora_weights=False)
    layer.set_adapter(["default", "b"])
    x = torch.randn(7, 20, requires_grad=True)
    y = layer(x)
    assert op_calls == [0.0], "both adapters (same dropout) in one fused op call"
    leaves = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_A["b"].weight, layer.lora_B["b"].weight]
    x64 = x.detach().double().requires_grad_(True)
    l64 = [p.detach().double().requires_grad_(True) for p in leaves]
    W = layer.base_layer.weight.double()
    ref = x64 @ W.t() + layer.base_layer.bias.double() + 2.0 * (x64 @ l64[0].t()) @ l64[1].t() + 0.5 * (x64 @ l64[2].t()) @ l64[3].t()
    assert_close(y, ref, TOL, "y")
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    assert_close(x.grad, x64.grad, TOL, "dx")
    for p, p64, name in zip(leaves, l64, ["A1", "B1", "A2", "B2"]):
        assert_close(p.grad, p64.grad, TOL, name)


def test_adapters_without_dropout_fuse_each_dropout_adapter_gets_its_own_call(op_calls):
    layer = LoraLinear(nn.Linear(20, 12), r=2, lora_dropout=0.1, init_lora_weights=False)
    layer.update_layer("b", 2, 8, lora_dropout=0.1, init_lora_weights=False)
    layer.update_layer("c", 2, 8, lora_dropout=0.3, init_lora_weights=False)
    layer.update_layer("d", 2, 8, lora_dropout=0.0, init_lora_weights=False)
    layer.update_layer("e", 3, 8, lora_dropout=0.0, init_lora_weights=False)
    layer.set_adapter(["default", "b", "c", "d", "e"])
    x = torch.randn(4, 20)
    layer.train()
    layer(x)
    # d and e (no dropout) fused with the base GEMM; default, b and c one call each.
    assert op_calls == [0.0, 0.1, 0.1, 0.3]
    op_calls.clear()
    layer.eval()
    assert_close(layer(x), _naive_multi(layer, x, ["default", "b", "c", "d", "e"]), TOL, "eval: all adapters")
    assert op_calls == [0.0], "eval mode: no dropout, one call"


def test_two_adapters_with_equal_dropout_have_independent_masks():
    """Each dropout adapter draws its own seed (PEFT: one nn.Dropout per adapter). With
    A = e_j and B = 1 an adapter adds s·D(x)[:, j] to every column: rows where one
    adapter kept x[:, j] and the other dropped it must occur."""
    torch.manual_seed(4)
    x = torch.randn(64, 8)
    W = torch.zeros(6, 8)
    A = torch.zeros(1, 8)
    A[0, 3] = 1.0
    B = torch.ones(6, 1)
    y = lora_linear_multi(x, W, None, [(A, B, 1.0, 0.5), (A, B, 1.0, 0.5)])
    kept = x[:, 3] / 0.5
    both = (y[:, 0] - 2 * kept).abs() <= 1e-5 * kept.abs().clamp_min(1)
    one = (y[:, 0] - kept).abs() <= 1e-5 * kept.abs().clamp_min(1)
    none = y[:, 0].abs() <= 1e-6
    assert bool((both | one | none).all())
    assert int(one.sum()) > 10, "one kept, one dropped: the masks differ"


def test_second_dropout_group_is_dropout_of_the_lora_term():
    """Group 2 (p=0.5) goes through the op on the LoRA term alone (weight=None); with
    A = e_j and B = 1, its contribution per row is s·D(x)[:, j]: either 0 or
    s·x[:, j]/(1-p), the same in every output column, and both cases occur."""
    torch.manual_seed(3)
    x = torch.randn(64, 8)
    W, b = torch.randn(6, 8), torch.randn(6)
    A1, B1 = torch.randn(2, 8), torch.randn(6, 2)
    A2 = torch.zeros(1, 8)
    A2[0, 3] = 1.0
    B2 = torch.ones(6, 1)
    y = lora_linear_multi(x, W, b, [(A1, B1, 0.5, 0.0), (A2, B2, 2.0, 0.5)])
    extra = y - (x @ W.t() + b + 0.5 * (x @ A1.t()) @ B1.t())
    assert_close(extra, extra[:, :1].expand_as(extra), TOL, "same in every column")
    kept = 2.0 * x[:, 3] / 0.5
    is_kept = (extra[:, 0] - kept).abs() <= 1e-5 * kept.abs().clamp_min(1)
    is_dropped = extra[:, 0].abs() <= 1e-5
    assert bool((is_kept | is_dropped).all())
    assert 10 < int(is_kept.sum()) < 54


def test_set_adapter_switches_output_and_trainability(llama):
    model = lorakern.inject(copy.deepcopy(llama), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakern.inject(model, LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"]), adapter_name="b")
    assert active_adapters(model) == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable), "the added adapter is inactive and frozen (PEFT)"
    randomize_adapters(model)
    ids = input_ids()
    y_default = logits(model, ids)
    lorakern.set_adapter(model, "b")
    assert all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    y_b = logits(model, ids)
    lorakern.set_adapter(model, ["default", "b"])
    y_both = logits(model, ids)
    assert not torch.allclose(y_default, y_b)
    # Both active = per-layer sums; check one layer exactly and that the model differs from either alone.
    v = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 64)
    assert_close(v(x), _naive_multi(v, x, ["default", "b"]), TOL, "v_proj with both")
    assert not torch.allclose(y_both, y_default) and not torch.allclose(y_both, y_b)
    with pytest.raises(ValueError, match="no adapter named"):
        lorakern.set_adapter(model, "nope")


def test_disable_adapters_context(llama):
    model = lorakern.inject(copy.deepcopy(llama), LoraConfig(target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model)
    ids = input_ids()
    y = logits(model, ids)
    with lorakern.disable_adapters(model):
        assert_close(logits(model, ids), logits(llama, ids), TOL, "disabled = base")
    assert torch.equal(logits(model, ids), y)
    lorakern.merge(model)
    with lorakern.disable_adapters(model):
        assert_close(logits(model, ids), logits(llama, ids), TOL, "disabled after merge = base")


def test_delete_adapter(llama):
    base_state = full_state(llama)
    model = lorakern.inject(copy.deepcopy(llama), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    lorakern.inject(model, LoraConfig(target_modules=["q_proj", "k_proj"]), adapter_name="b")
    lorakern.set_adapter(model, "b")
    lorakern.delete_adapter(model, "b")
    assert active_adapters(model) == ["default"]
    assert {n for n, _ in lora_layers(model)} == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert all("b" not in layer.lora_A for _, layer in lora_layers(model))
    lorakern.delete_adapter(model, "default")
    assert not list(lora_layers(model)) and not list(saved_modules(model))
    assert not hasattr(model, "_lorakern")
    assert model.state_dict().keys() == base_state.keys()
    for k, v in base_state.items():
        assert torch.equal(model.state_dict()[k], v), k


# ----------------------------------------------------------------------------- combine


@pytest.fixture
def two_adapter_mlp():
    model = lorakern.inject(tiny_mlp(), LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"]))
    lorakern.inject(model, LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=["up"]), adapter_name="b")
    randomize_adapters(model, scale=0.3)
    return model


def test_add_weighted_adapter_cat_is_exact(two_adapter_mlp):
    model = two_adapter_mlp
    lorakern.add_weighted_adapter(model, ["default", "b"], [0.6, -1.5], "mix", combination_type="cat")
    for name, layer in lora_layers(model):
        expected = 0.6 * layer.get_delta_weight("default")
        if "b" in layer.lora_A:
            expected = expected + -1.5 * layer.get_delta_weight("b")
        assert layer.r["mix"] == 5 and layer.scaling["mix"] == 1.0
        assert_close(layer.get_delta_weight("mix"), expected, TOL, name)
        assert not layer.lora_A["mix"].weight.requires_grad
    assert active_adapters(model) == ["default"]


def test_add_weighted_adapter_svd_truncates(two_adapter_mlp):
    model = two_adapter_mlp
    lorakern.add_weighted_adapter(model, ["default", "b"], [1.0, 2.0], "full", combination_type="svd", svd_rank=5)
    lorakern.add_weighted_adapter(model, ["default", "b"], [1.0, 2.0], "low", combination_type="svd", svd_rank=2)
    for name, layer in lora_layers(model):
        target = layer.get_delta_weight("default") + (2.0 * layer.get_delta_weight("b") if "b" in layer.lora_A else 0)
        assert_close(layer.get_delta_weight("full"), target, 1e-5, f"{name} rank >= rank(ΔW): exact")
        U, S, Vh = torch.linalg.svd(target.double())
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        assert_close(layer.get_delta_weight("low"), best, 1e-5, f"{name} best rank-2 approximation")


def test_add_weighted_adapter_linear_definition_and_rank_check(two_adapter_mlp):
    model = two_adapter_mlp
    with pytest.raises(ValueError, match="equal ranks"):
        lorakern.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "lin", combination_type="linear")
    lorakern.add_weighted_adapter(model, ["default"], [-0.5], "neg", combination_type="linear")
    for name, layer in lora_layers(model):
        assert_close(layer.get_delta_weight("neg"), -0.5 * layer.get_delta_weight("default"), TOL, name)


# ------------------------------------------------------------------------- merge/unload


def test_merge_unmerge_round_trip_fp32(llama):
    model = lorakern.inject(copy.deepcopy(llama), LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    ids = input_ids()
    y = logits(model, ids)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model)}
    lorakern.merge(model)
    assert all(layer.merged for _, layer in lora_layers(model))
    assert_close(logits(model, ids), y, TOL, "merged logits")
    lorakern.unmerge(model)
    for n, layer in lora_layers(model):
        assert_close(layer.base_layer.weight, weights[n], 1e-6, n)
    assert_close(logits(model, ids), y, TOL, "unmerged logits")


def test_merge_unmerge_bf16_error_bound():
    """bf16: merge = round(W + ΔW), unmerge = round(merged − ΔW), ΔW in fp32, so elementwise
    |W' − W| ≤ u·|W + ΔW| + u·(|W| + u·|W + ΔW|) with u = 2⁻⁸ (bf16 unit roundoff)."""
    layer = LoraLinear(nn.Linear(64, 48).to(torch.bfloat16), r=4, lora_alpha=8, init_lora_weights=False)
    W = layer.base_layer.weight.detach().float().clone()
    delta = layer.get_delta_weight("default")
    layer.merge()
    merged = layer.base_layer.weight.detach().float().clone()
    assert torch.equal(merged, (W + delta).to(torch.bfloat16).float()), "merged in fp32, cast once"
    layer.unmerge()
    u = 2.0**-8
    bound = u * (W + delta).abs() + u * (W.abs() + u * (W + delta).abs())
    err = (layer.base_layer.weight.float() - W).abs()
    assert bool((err <= bound * 1.0001).all()), f"max excess {(err - bound).max().item()}"
    assert err.max() > 0, "bf16 rounding is visible (the bound is not vacuous)"


def test_safe_merge_nan_raises_and_changes_nothing(llama):
    model = lorakern.inject(copy.deepcopy(llama), LoraConfig(target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    before = full_state(model)
    with pytest.raises(ValueError, match=r"non-finite.*layers\.1\.self_attn\.v_proj"):
        lorakern.merge(model, safe_merge=True)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) or (torch.isnan(v).any() and torch.equal(after[k].isnan(), v.isnan())), k
    assert not any(layer.merged for _, layer in lora_layers(model))


def test_unload_merge_and_no_merge(llama):
    ids = input_ids()
    model = lorakern.inject(copy.deepcopy(llama), LoraConfig(target_modules=["q_proj", "gate_proj"], modules_to_save=["lm_head"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.1)
    y = logits(model, ids)
    merged = lorakern.unload(copy.deepcopy(model), merge=True)
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in merged.modules())
    assert merged.state_dict().keys() == llama.state_dict().keys()
    assert_close(logits(merged, ids), y, TOL, "merge_and_unload logits")
    trained_head = model.lm_head.modules_to_save["default"].weight.detach().clone()
    lorakern.merge(model)  # even merged, unload(merge=False) gives the original base weights back
    plain = lorakern.unload(model, merge=False)
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in plain.modules())
    for k, v in llama.state_dict().items():
        # ... and keeps the trained modules_to_save copy, as PEFT's unload does.
        assert_close(plain.state_dict()[k], trained_head if k == "lm_head.weight" else v, 1e-6, k)


def test_trainable_parameters_summary_format():
    model = lorakern.inject(tiny_mlp(), LoraConfig(r=2, target_modules=["head"]))
    t, total = lorakern.trainable_parameters(model)
    assert t == 2 * 16 + 5 * 2
    line = lorakern.trainable_parameters_summary(model)
    assert line == f"trainable params: {t:,} || all params: {total:,} || trainable%: {100 * t / total:.4f}"
    assert math.isclose(float(line.rsplit(" ", 1)[-1]), 100 * t / total, rel_tol=1e-4)


@requires_triton
def test_conv1d_two_adapters_triton_matches_reference(gpt2):
    """The kernels get the Conv1D weight as a transposed (strided) view and both adapters
    concatenated: same values and grads as the reference path (interpreter on CPU)."""
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        layer = LoraLinear(copy.deepcopy(gpt2.transformer.h[0].mlp.c_proj), r=4, init_lora_weights=False, backend=backend)
        layer.update_layer("b", 3, 6, init_lora_weights=False)
        layer.set_adapter(["default", "b"])
        x = torch.randn(9, layer.in_features, device=KERNEL_DEVICE, requires_grad=True)
        layer.to(KERNEL_DEVICE)
        y = layer(x)
        y.square().sum().backward()
        results[backend] = [y, x.grad] + [d[n].weight.grad for d in (layer.lora_A, layer.lora_B) for n in ("default", "b")]
    for i, (out, ref) in enumerate(zip(results["triton"], results["reference"])):
        assert_close(out, ref, TOL, f"output {i}")


def test_inject_refuses_a_layer_that_already_has_the_name():
    seq = nn.Sequential(LoraLinear(nn.Linear(4, 4)), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="already have an adapter named 'default'"):
        lorakern.inject(seq, LoraConfig(target_modules=["0", "1"]))
    assert isinstance(seq[1], nn.Linear) and not isinstance(seq[1], LoraLinear), "nothing injected"


def test_injected_model_pickles_and_deepcopies():
    import io

    model = lorakern.inject(tiny_mlp(), LoraConfig(target_modules=["up"], modules_to_save=["head"], init_lora_weights=False))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    dup = copy.deepcopy(model)
    x = torch.randn(3, 16)
    assert torch.equal(again(x), model(x)) and torch.equal(dup(x), model(x))
    assert active_adapters(again) == ["default"] and isinstance(again.head, ModulesToSave)


@pytest.mark.parametrize("training", [False, True])
def test_inject_keeps_train_eval_mode(training):
    model = tiny_mlp().train(training)
    lorakern.inject(model, LoraConfig(target_modules=["up"], modules_to_save=["head"], lora_dropout=0.5))
    assert all(m.training == training for m in model.modules())


def test_delete_merged_adapter_keeps_other_merged():
    layer = LoraLinear(nn.Linear(10, 6), r=2, init_lora_weights=False)
    layer.update_layer("b", 3, 4, init_lora_weights=False)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(["default", "b"])
    layer.delete_adapter("default")
    assert layer.merged_adapters == ["b"]
    assert_close(layer.base_layer.weight, w0 + layer.get_delta_weight("b"), 1e-6, "only b merged")
