"""LoRA on nn.Conv2d (lorakern.LoraConv2d), checked against PEFT's lora.Conv2d.

PEFT 0.21 is the oracle: with the same adapter weights, the same outputs and gradients
(dropout included: both draw torch's dropout mask), the same merged weights and biases,
and adapter files that move both ways with equal outputs. The model is a small CNN: a
3×3 stride-2 padded convolution, a 1×1 convolution, a 5×3 one with asymmetric padding,
and a linear head. Comparisons are fp32 at RTOL[float32].
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakern
from lorakern import adapters as adapters_mod
from lorakern.adapters import AdapterLoadError
from lorakern.conv import LoraConv2d
from lorakern.model import lora_layers
from tests.test_model_helpers import assert_same_state, full_state
from tests.utils import RTOL, assert_close

pytestmark = pytest.mark.usefixtures("quiet_warnings")

peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

TOL = RTOL[torch.float32]
PREFIX = "base_model.model."
ST = "adapter_model.safetensors"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 6, 1, bias=False)
        self.c3 = nn.Conv2d(6, 5, (5, 3), padding=(2, 0))
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(self.c3(x).mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(77)
    return Net().eval()


@pytest.fixture
def x():
    return torch.randn(4, 3, 11, 9, generator=torch.Generator().manual_seed(5))


CASES = {
    "convs": dict(r=4, lora_alpha=8, target_modules=["c1", "c2", "c3"]),
    "convs-linear-patterns": dict(
        r=4, lora_alpha=8, target_modules=["c1", "c3", "fc"], use_rslora=True, rank_pattern={"c3": 2}, alpha_pattern={"c1": 3},
    ),
    "lora_bias": dict(r=3, lora_alpha=6, target_modules=["c1", "c3"], lora_bias=True),
}


def _pair(base, kwargs, init=False):
    """(PEFT model, lorakern model) with the same adapter weights (PEFT's init)."""
    kwargs = {"init_lora_weights": init, **kwargs}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**kwargs))
    missing, unexpected = model.load_state_dict({n.removeprefix(PREFIX): p for n, p in pm.state_dict().items()})
    assert not missing and not unexpected, (missing, unexpected)
    return pm, model


def _grads(model, prefix=""):
    return {n.removeprefix(prefix): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_peft(case, net, x):
    pm, model = _pair(net, CASES[case])
    convs = {n for n, layer in lora_layers(model) if isinstance(layer, LoraConv2d)}
    assert convs == {n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Conv2d)}
    for name, layer in lora_layers(model):
        theirs = pm.base_model.model.get_submodule(name)
        assert layer.scaling["default"] == pytest.approx(theirs.scaling["default"], rel=1e-12), name
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n.removeprefix(PREFIX) for n, p in pm.named_parameters() if p.requires_grad
    }
    assert lorakern.trainable_parameters(model) == pm.get_nb_trainable_parameters()
    y_theirs, y_ours = pm(x), model(x)
    assert not torch.allclose(y_ours, net(x))
    assert_close(y_ours, y_theirs, TOL, "output")
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    g_theirs, g_ours = _grads(pm, PREFIX), _grads(model)
    assert g_ours.keys() == g_theirs.keys()
    for n in g_ours:
        assert_close(g_ours[n], g_theirs[n], TOL, f"grad {n}")


def test_dropout_matches_peft_draw_for_draw(net, x):
    """Training mode with dropout: both draw torch's dropout mask on the adapter input, in
    the same order, so from one seed the outputs are equal (and differ from eval mode)."""
    pm, model = _pair(net, dict(r=4, lora_alpha=8, target_modules=["c1", "c3"], lora_dropout=0.3))
    pm.train()
    model.train()
    torch.manual_seed(9)
    y_theirs = pm(x)
    torch.manual_seed(9)
    y_ours = model(x)
    assert_close(y_ours, y_theirs, TOL, "train-mode output")
    model.eval()
    assert not torch.allclose(model(x), y_ours)


def test_default_init_is_peft_s(net, x):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["c1", "c3"])
    torch.manual_seed(21)
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**kwargs))
    torch.manual_seed(21)
    model = lorakern.inject(copy.deepcopy(net), lorakern.LoraConfig(**kwargs))
    theirs = {n.removeprefix(PREFIX): p for n, p in pm.state_dict().items() if "lora_" in n}
    ours = {n: p for n, p in model.state_dict().items() if "lora_" in n}
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert torch.equal(ours[n], theirs[n]), n
    assert model.c1.lora_A["default"].weight.abs().sum() > 0
    assert torch.equal(model(x), net(x))  # B = 0


@pytest.mark.parametrize("case", ["convs-linear-patterns", "lora_bias"])
def test_merge_unmerge_unload_match_peft(case, net, x):
    pm, model = _pair(net, CASES[case])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = model(x).detach()
    lorakern.merge(model)
    assert_close(model(x), unmerged, TOL, "merged output")
    for name in ("c1", "c3"):
        layer = model.get_submodule(name)
        assert layer.merged_adapters == ["default"]
        assert layer.get_delta_weight("default").shape == layer.base_layer.weight.shape
        theirs = pm.base_model.model.get_submodule(name).get_delta_weight("default")
        assert_close(layer.get_delta_weight("default"), theirs, TOL, f"{name} delta")
    lorakern.unmerge(model)
    for n, p in model.named_parameters():
        if n in before:
            assert_close(p, before[n], 1e-6, f"{n} after unmerge")
    merged_theirs = pm.merge_and_unload()
    merged_ours = lorakern.unload(model, merge=True)
    assert type(merged_ours.c1) is nn.Conv2d
    sd_ours, sd_theirs = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for k in sd_ours:
        assert_close(sd_ours[k], sd_theirs[k], TOL, k)


def test_lora_bias_without_base_bias_cannot_merge(net):
    with pytest.warns(UserWarning, match="cannot be merged"):
        _, model = _pair(net, dict(r=2, target_modules=["c2"], lora_bias=True))
    before = full_state(model)
    with pytest.raises(RuntimeError, match="lora_bias=True.*no bias"):
        lorakern.merge(model)
    assert_same_state(model, before)


def _two_adapters(net):
    k1 = dict(r=4, lora_alpha=8, target_modules=["c1", "c3"], init_lora_weights=False)
    k2 = dict(r=2, lora_alpha=3, target_modules=["c1", "fc"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**k1))
    pm.add_adapter("b", peft.LoraConfig(**k2))
    model = lorakern.inject(copy.deepcopy(net), lorakern.LoraConfig(**k1))
    lorakern.inject(model, lorakern.LoraConfig(**k2), adapter_name="b")
    model.load_state_dict({n.removeprefix(PREFIX): p for n, p in pm.state_dict().items()})
    return pm.eval(), model.eval()


def test_set_adapter_disable_delete_match_peft(net, x):
    pm, model = _two_adapters(net)
    lorakern.set_adapter(model, ["default", "b"])
    pm.base_model.set_adapter(["default", "b"])
    assert_close(model(x), pm(x), TOL, "both")
    with lorakern.disable_adapters(model):
        assert torch.equal(model(x), net(x))
    lorakern.delete_adapter(model, "default")
    pm.delete_adapter("default")
    assert_close(model(x), pm(x), TOL, "b alone")
    assert type(model.c3) is nn.Conv2d and isinstance(model.c1, LoraConv2d)


def test_mixed_batch_matches_peft(net, x):
    pm, model = _two_adapters(net)
    names = ["b", "__base__", "default", "b"]
    with lorakern.mixed_batch(model, names):
        ours = model(x)
    with torch.no_grad():
        theirs = pm(x, adapter_names=names)
    assert_close(ours, theirs, TOL, "mixed batch")
    lorakern.set_adapter(model, "default")
    assert_close(ours[2:3], model(x[2:3]), TOL, "row 2 alone")


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_add_weighted_adapter_matches_peft(combination_type, net, x):
    pm, model = _two_adapters(net)
    weights = [0.7, -1.3]
    pm.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination_type)
    lorakern.add_weighted_adapter(model, ["default", "b"], weights, "mix", combination_type=combination_type)
    for name in ("c1", "c3"):
        ours, theirs = model.get_submodule(name), pm.base_model.model.get_submodule(name)
        assert_close(ours.get_delta_weight("mix"), theirs.get_delta_weight("mix"), TOL, f"{name} delta")
    pm.set_adapter("mix")
    lorakern.set_adapter(model, "mix")
    assert_close(model(x), pm(x), TOL, "combined adapter")


@pytest.mark.parametrize("case", ["convs-linear-patterns", "lora_bias"])
def test_adapter_files_both_ways(case, net, x, tmp_path):
    pm, model = _pair(net, CASES[case])
    lorakern.save_adapter(model, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "theirs")
    ours, theirs = load_file(tmp_path / "ours" / ST), load_file(tmp_path / "theirs" / ST)
    assert ours.keys() == theirs.keys()
    assert tuple(ours[f"{PREFIX}c3.lora_A.weight"].shape) == (CASES[case].get("rank_pattern", {}).get("c3", CASES[case]["r"]), 6, 5, 3)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    from_peft = lorakern.load_adapter(copy.deepcopy(net), tmp_path / "theirs")
    assert_close(from_peft(x), pm(x), TOL, "PEFT file in lorakern")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "ours")
    assert_close(in_peft(x), model(x), TOL, "lorakern file in PEFT")


@pytest.mark.parametrize("problem", ["kernel-shape", "flattened", "nan"])
def test_bad_conv_file_is_refused_and_changes_nothing(net, tmp_path, problem):
    _, model = _pair(net, CASES["convs"])
    lorakern.save_adapter(model, tmp_path / "good")
    tensors = load_file(tmp_path / "good" / ST)
    key = f"{PREFIX}c3.lora_A.weight"
    if problem == "kernel-shape":
        tensors[key] = torch.randn(4, 6, 3, 3)
    elif problem == "flattened":  # a linear layer's [r, in] layout
        tensors[key] = tensors[key].flatten(1)
    else:
        tensors[key][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    save_file(tensors, bad / ST, metadata={"format": "pt"})
    target = copy.deepcopy(net)
    before = full_state(target)
    match = "non-finite" if problem == "nan" else r"c3' lora_A: expected shape \[4, 6, 5, 3\]"
    with pytest.raises(AdapterLoadError, match=match):
        lorakern.load_adapter(target, bad)
    assert_same_state(target, before)
    assert type(target.c1) is nn.Conv2d and not hasattr(target, "_lorakern")


def test_failure_while_writing_rolls_back(net, tmp_path, monkeypatch):
    _, model = _pair(net, CASES["lora_bias"])
    lorakern.save_adapter(model, tmp_path)
    target = copy.deepcopy(net)
    before = full_state(target)
    real = adapters_mod._write_values

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("interrupted (simulated)")

    monkeypatch.setattr(adapters_mod, "_write_values", write_then_fail)
    with pytest.raises(KeyboardInterrupt, match="simulated"):
        lorakern.load_adapter(target, tmp_path, is_trainable=True)
    assert_same_state(target, before)
    assert type(target.c1) is nn.Conv2d and not hasattr(target, "_lorakern")
    assert all(p.requires_grad for p in target.parameters())


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.dilated = nn.Conv2d(4, 4, 3, dilation=2)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.bilinear = nn.Bilinear(4, 4, 4)
        self.plain = nn.Conv2d(4, 4, 3)


@pytest.mark.parametrize("target, exc, match", [
    ("grouped", TypeError, "groups=2: LoRA on grouped convolutions is not implemented"),
    ("dilated", TypeError, r"dilation=\(2, 2\): LoRA on dilated convolutions is not implemented"),
    ("reflect", TypeError, "padding_mode='reflect'"),
    ("bilinear", TypeError, "Bilinear; lorakern's LoRA supports nn.Linear, transformers Conv1D, nn.Embedding and nn.Conv1d"),
])
def test_unsupported_convolutions_are_refused(target, exc, match):
    model = _Odd()
    before = full_state(model)
    with pytest.raises(exc, match=match):
        lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["plain", target]))
    assert_same_state(model, before)
    assert type(model.plain) is nn.Conv2d


def test_dora_on_conv_is_refused():
    with pytest.raises(ValueError, match=r"'plain' is a Conv2d: use_dora=True \(DoRA\) is not implemented"):
        lorakern.inject(_Odd(), lorakern.LoraConfig(r=2, target_modules=["plain"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        LoraConv2d(nn.Conv2d(3, 3, 1), use_dora=True)
    with pytest.raises(TypeError, match="base_layer must be nn.Conv1d, nn.Conv2d or nn.Conv3d, got Linear"):
        LoraConv2d(nn.Linear(3, 3))


# ---------------------------------------------------------------------------- Conv1d, Conv3d


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(8, 5, 3)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean(2))


class Net3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 6, (3, 3, 1), padding=(1, 1, 0))
        self.c2 = nn.Conv3d(6, 4, 1, bias=False)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))).mean((2, 3, 4))


NETS = {"conv1d": (Net1d, (4, 3, 17)), "conv3d": (Net3d, (2, 2, 5, 4, 3))}


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("lora_bias", [False, True], ids=["plain", "lora_bias"])
def test_conv1d_and_conv3d_match_peft(kind, lora_bias, tmp_path):
    """PEFT's lora.Conv1d / Conv3d: outputs, gradients, merge, and files both ways."""
    build, shape = NETS[kind]
    torch.manual_seed(78)
    base = build().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    kwargs = dict(r=3, lora_alpha=5, target_modules=["c1", "c2"], lora_bias=lora_bias and kind == "conv1d")
    pm, model = _pair(base, kwargs)
    assert all(isinstance(layer, lorakern.LoraConv) for _, layer in lora_layers(model))
    kernel = base.c1.kernel_size
    assert model.c1.lora_B["default"].weight.shape == (8 if kind == "conv1d" else 6, 3, *(1,) * len(kernel))
    y_theirs, y_ours = pm(x), model(x)
    assert not torch.allclose(y_ours, base(x))
    assert_close(y_ours, y_theirs, TOL, "output")
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    g_theirs, g_ours = _grads(pm, PREFIX), _grads(model)
    assert g_ours.keys() == g_theirs.keys()
    for n in g_ours:
        assert_close(g_ours[n], g_theirs[n], TOL, f"grad {n}")
    with torch.no_grad():
        lorakern.save_adapter(model, tmp_path / "ours")
        pm.save_pretrained(tmp_path / "peft")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        loaded = lorakern.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
        assert_close(theirs(x), y_theirs, TOL, "PEFT loads lorakern's file")
        assert_close(loaded(x), y_theirs, TOL, "lorakern loads PEFT's file")
        merged = lorakern.unload(loaded, merge=True)
        assert type(merged.c1) is type(base.c1)
        # PEFT's own merge fails on a 1x1x1 Conv3d (it squeezes two dims, as for Conv2d), so
        # the merged model is compared with the adapter's output
        assert_close(merged(x), y_theirs, TOL, "merge_and_unload")
        if kind == "conv1d":
            assert_close(merged(x), pm.merge_and_unload()(x), TOL, "PEFT's merge_and_unload")
