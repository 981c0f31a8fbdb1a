"""PEFT's semantics where lorakern's merged state meets set_adapter, load_adapter and unload.

Regression tests for three silent wrong results (issue 10):
- set_adapter on a merged model / layer kept the merged adapter in the base weight, so the
  newly set adapters were ignored (PEFT warns and unmerges first);
- load_adapter into a merged adapter replaced its weights under the merged delta, so a
  later unmerge subtracted the wrong delta and the base weight drifted (now refused);
- unload(merge=False) put back the original modules_to_save module, dropping the trained
  copy (PEFT's unload and merge_and_unload both keep the active adapter's copy).
PEFT itself is the oracle wherever the two can run the same weights.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakern
from lorakern import LoraConfig, LoraLinear
from lorakern.model import ModulesToSave, lora_layers, saved_modules
from tests.test_model_helpers import assert_same_state, full_state, tiny_mlp
from tests.utils import RTOL, assert_close

peft = pytest.importorskip("peft")

TOL = RTOL[torch.float32]
PREFIX = "base_model.model."
UNMERGING = "Adapter cannot be set when the model is merged"

# Two adapters on tiny_mlp: "default" has LoRA on up/down and a trainable copy of the
# head; "b" has LoRA on up only (no head copy). init_lora_weights=False: both random.
KW_DEFAULT = dict(r=4, lora_alpha=8, target_modules=["up", "down"], modules_to_save=["head"], init_lora_weights=False)
KW_B = dict(r=2, lora_alpha=6, target_modules=["up"], init_lora_weights=False)


@pytest.fixture
def quiet():
    """PEFT warns about plain nn.Module bases; these tests check warnings themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _pair():
    """The same two-adapter model in PEFT and in lorakern (PEFT's random weights, a head
    copy changed as training would), and an input."""
    base = tiny_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**KW_DEFAULT))
        pm.add_adapter("b", peft.LoraConfig(**KW_B))
    with torch.no_grad():
        pm.base_model.model.head.modules_to_save["default"].weight.add_(0.5)
    model = lorakern.inject(copy.deepcopy(base), LoraConfig(**KW_DEFAULT))
    lorakern.inject(model, LoraConfig(**KW_B), adapter_name="b")
    model.load_state_dict({k.removeprefix(PREFIX): v for k, v in pm.state_dict().items()})
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    return base, pm, model, x


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model)}


# ------------------------------------------------------------ set_adapter on a merged model


@pytest.mark.parametrize("new_active", ["b", ["default", "b"], "default"], ids=["b", "both", "same"])
def test_set_adapter_on_merged_model_unmerges_like_peft(new_active):
    base, pm, model, x = _pair()
    w0 = _base_weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    lorakern.merge(model)
    assert all(layer.merged for _, layer in lora_layers(model))

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lorakern.set_adapter(model, new_active)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.base_model.set_adapter(new_active)

    with torch.no_grad():
        assert_close(model(x), pm(x), TOL, f"output with {new_active} active")
    assert not any(layer.merged for _, layer in lora_layers(model))
    for name, w in _base_weights(model).items():
        assert_close(w, w0[name], 1e-6, f"{name} base weight after the unmerge")
    assert sum(UNMERGING in str(w.message) for w in record) == 1, "one warning per call, not one per layer"


def test_set_adapter_on_merged_layer_unmerges():
    torch.manual_seed(1)
    layer = LoraLinear(nn.Linear(10, 6), r=2, init_lora_weights=False)
    layer.update_layer("b", 3, 4, init_lora_weights=False)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 10)
    layer.merge(["default"])
    with pytest.warns(UserWarning, match=UNMERGING):
        layer.set_adapter("b")
    ref = x.double() @ (w0.double() + layer.get_delta_weight("b").double()).T + layer.base_layer.bias.double()
    assert_close(layer(x), ref, TOL, "output with b active")
    assert layer.merged_adapters == [] and layer.active_adapters == ["b"]
    assert_close(layer.base_layer.weight, w0, 1e-6, "base weight after the unmerge")


def test_refused_set_adapter_leaves_the_merge_in_place(quiet):
    _, _, model, _ = _pair()
    lorakern.merge(model)
    before = full_state(model)
    with pytest.raises(ValueError, match="no adapter named"):
        lorakern.set_adapter(model, "nope")
    assert all(layer.merged_adapters == ["default"] for _, layer in lora_layers(model))
    assert_same_state(model, before)


# ------------------------------------------------------- load_adapter into a merged adapter


def test_load_adapter_into_merged_adapter_is_refused(tmp_path, quiet):
    _, _, model, x = _pair()
    lorakern.save_adapter(model, tmp_path, adapter_name="b")
    w0 = _base_weights(model)
    lorakern.set_adapter(model, ["default", "b"])
    lorakern.merge(model)
    before = full_state(model)
    merged = {n: list(layer.merged_adapters) for n, layer in lora_layers(model)}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    y = model(x)

    with pytest.raises(ValueError, match=r"adapter 'b' is merged") as err:
        lorakern.load_adapter(model, tmp_path, adapter_name="b", is_trainable=True)
    assert "unmerge" in str(err.value)

    assert_same_state(model, before)
    assert {n: list(layer.merged_adapters) for n, layer in lora_layers(model)} == merged
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert torch.equal(model(x), y)
    lorakern.unmerge(model)
    for name, w in _base_weights(model).items():
        assert_close(w, w0[name], 1e-6, f"{name} base weight after unmerge")


def test_load_adapter_into_unmerged_adapter_still_works(tmp_path, quiet):
    _, _, model, x = _pair()
    lorakern.save_adapter(model, tmp_path, adapter_name="b")
    with torch.no_grad():
        y_before = model(x)
        for _, layer in lora_layers(model):
            if "b" in layer.lora_B:
                layer.lora_B["b"].weight.zero_()
    lorakern.load_adapter(model, tmp_path, adapter_name="b")
    with torch.no_grad():
        assert torch.equal(model(x), y_before)


def test_update_layer_refuses_a_merged_adapter():
    torch.manual_seed(2)
    layer = LoraLinear(nn.Linear(10, 6), r=2, init_lora_weights=False)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    before = full_state(layer)
    with pytest.raises(ValueError, match=r"adapter 'default' is merged"):
        layer.update_layer("default", 4, 8, init_lora_weights=False)
    assert_same_state(layer, before)
    assert layer.r["default"] == 2 and layer.merged_adapters == ["default"]
    layer.unmerge()
    assert_close(layer.base_layer.weight, w0, 1e-6, "base weight after unmerge")


# ------------------------------------------------------------------ unload: modules_to_save


@pytest.mark.parametrize("merge", [False, True], ids=["unload", "merge_and_unload"])
def test_unload_keeps_the_trained_modules_to_save_copy_like_peft(merge, quiet):
    base, pm, model, x = _pair()
    trained_head = pm.base_model.model.head.modules_to_save["default"].weight.detach().clone()
    theirs = pm.merge_and_unload() if merge else pm.unload()
    ours = lorakern.unload(model, merge=merge)

    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in ours.modules())
    assert isinstance(ours.head, nn.Linear) and torch.equal(ours.head.weight, trained_head)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys() == base.state_dict().keys()
    for k in sd_ours:
        assert_close(sd_ours[k], sd_theirs[k], TOL, k)
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()
    }
    with torch.no_grad():
        assert_close(ours(x), theirs(x), TOL, "unloaded output")


@pytest.mark.parametrize("merge", [False, True], ids=["unload", "merge_and_unload"])
def test_unload_gives_the_original_when_the_active_adapter_has_no_copy(merge, quiet):
    base, pm, model, x = _pair()
    pm.set_adapter("b")
    lorakern.set_adapter(model, "b")
    theirs = pm.merge_and_unload() if merge else pm.unload()
    ours = lorakern.unload(model, merge=merge)
    assert torch.equal(ours.head.weight, base.head.weight)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), TOL, "unloaded output")


def test_unload_inside_disable_adapters_keeps_the_copy_like_peft(quiet):
    """PEFT's unload ignores the disabled flag: the active adapter's copy is kept."""
    _, pm, model, x = _pair()
    with pm.disable_adapter():
        theirs = pm.merge_and_unload()
    with lorakern.disable_adapters(model):
        ours = lorakern.unload(model, merge=True)
    assert not list(saved_modules(ours))
    assert torch.equal(ours.head.weight, theirs.head.weight)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), TOL, "unloaded output")
