"""ops.ScalarDict's mirrors: the CPU one every traced call could read, and the one on the
layer's accelerator that lets the traced Triton route build the kernels' scalars inside the
graph (no host op: CUDA graphs can capture it, issue 11 item 5).

Without a GPU the accelerator mirrors are placed on the meta device (the bookkeeping is the
same; values are checked on the CPU mirror and, on CUDA, in tests/test_compile.py). What the
traced graph holds is tests/test_triton_ops.py's (trace_triton_ops "graphs").
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lorakern
from lorakern import op_core
from lorakern.ops import ScalarDict, scalar_device

META = torch.device("meta")


def test_placed_mirrors_exist_for_every_key_and_stay_the_same_tensors():
    d = ScalarDict({"a": 0.5})
    d.place(META)
    a = d.tensor("a", META)
    assert a.device == META and a.dtype == torch.float64 and tuple(a.shape) == (1,)
    assert getattr(a, "_dynamo_static_input_type", None) is not None  # CUDA graphs read it in place
    d["a"] = 2.0
    d["b"] = 0.25  # a key added after placing gets its mirror too
    assert d.tensor("a", META) is a and d.tensor("b", META).device == META
    d.place(META)  # placing again where it is changes nothing
    assert d.tensor("a", META) is a
    assert d.tensor("a").device.type == "cpu" and d.tensor("a").item() == 2.0
    assert d.tensor("a", torch.device("cpu")) is d.tensor("a")


def test_unplaced_or_other_devices_get_the_cpu_mirror():
    d = ScalarDict({"a": 0.5})
    assert d.tensor("a", META) is d.tensor("a")
    d.place(META)
    d.place("cpu")  # back on the CPU: the device mirrors are dropped
    assert d.tensor("a", META) is d.tensor("a")


def test_in_place_union_updates_the_mirrors_and_checks():
    d = ScalarDict({"a": 0.5}, check=op_core.check_scaling_value)
    d.place(META)
    cpu = d.tensor("a")
    d |= {"a": 2.0, "b": 1.0}
    assert d.tensor("a") is cpu and cpu.item() == 2.0 and d.tensor("b", META).device == META
    with pytest.raises(ValueError, match="scaling"):
        d |= {"c": 3.0, "d": float("inf")}  # all or nothing
    assert isinstance(d, ScalarDict) and "c" not in d and "d" not in d


def test_removed_keys_drop_their_device_mirrors():
    d = ScalarDict({"a": 0.5, "b": 1.0, "c": 2.0})
    d.place(META)
    del d["a"]
    d.pop("b")
    assert d._device_tensors.keys() == {"c"}
    d.clear()
    assert d._device_tensors == {} and d._tensors == {}


def test_check_runs_on_every_assignment_and_a_refused_value_changes_nothing():
    d = ScalarDict({"p": 0.1}, check=op_core.check_dropout_value)
    with pytest.raises(ValueError, match="dropout_p"):
        d["p"] = 1.0
    with pytest.raises(ValueError, match="dropout_p"):
        d.update({"q": -0.5})
    assert dict(d) == {"p": 0.1} and d.tensor("p").item() == 0.1
    s = ScalarDict(check=op_core.check_scaling_value)
    for bad in (float("inf"), float("nan"), 1e39):
        with pytest.raises(ValueError, match="scaling"):
            s["a"] = bad
    assert dict(s) == {}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_values_and_check(how):
    d = ScalarDict({"a": 0.5}, check=op_core.check_scaling_value)
    d.place(META)
    e = copy.deepcopy(d) if how == "deepcopy" else pickle.loads(pickle.dumps(d))
    assert dict(e) == {"a": 0.5} and e.tensor("a").item() == 0.5
    with pytest.raises(ValueError, match="scaling"):
        e["a"] = float("inf")


def test_layer_places_its_mirrors_where_its_base_weight_goes():
    layer = lorakern.LoraLinear(torch.nn.Linear(8, 6), r=2, lora_alpha=4, lora_dropout=0.1)
    assert layer.scaling.tensor("default", META) is layer.scaling.tensor("default")  # CPU: no device mirror
    layer.to(META)
    for d in (layer.scaling, layer.lora_dropout):
        assert d.tensor("default", META).device == META
    copied = copy.deepcopy(layer)  # rebuilt ScalarDicts are placed again
    assert copied.scaling.tensor("default", META) is not copied.scaling.tensor("default")
    assert copied.scaling.tensor("default", META).device == META
    layer.update_layer("other", 2, 2.0)  # a new adapter's mirrors follow
    assert layer.scaling.tensor("other", META).device == META


@pytest.mark.parametrize("kind", ["embedding", "conv"])
def test_embedding_and_conv_layers_place_their_mirrors_too(kind):
    if kind == "embedding":
        layer = lorakern.LoraEmbedding(torch.nn.Embedding(10, 8), r=2, lora_alpha=4)
    else:
        layer = lorakern.LoraConv(torch.nn.Conv2d(3, 4, 3), r=2, lora_alpha=4)
    layer.to(META)
    assert layer.scaling.tensor("default", META).device == META
    assert copy.deepcopy(layer).scaling.tensor("default", META).device == META


def test_layer_refuses_bad_scalars_assigned_directly():
    layer = lorakern.LoraLinear(torch.nn.Linear(8, 6), r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="dropout_p"):
        layer.lora_dropout["default"] = 1.0
    with pytest.raises(ValueError, match="scaling"):
        layer.scaling["default"] = float("nan")
    assert layer.lora_dropout["default"] == 0.0 and layer.scaling["default"] == 2.0


def test_scalar_device_is_none_in_eager_mode():
    assert scalar_device("triton", torch.device("cuda"), torch.bfloat16) is None


def test_lora_linear_takes_a_scaling_on_x_device_and_refuses_one_elsewhere():
    x, W, A, B = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    y = lorakern.lora_linear(x, W, None, A, B, torch.tensor([0.5]))  # on x's device (the CPU)
    assert torch.equal(y, lorakern.lora_linear(x, W, None, A, B, 0.5))
    with pytest.raises(TypeError, match="scaling as a tensor .* on the CPU or on x's device"):
        lorakern.lora_linear(x, W, None, A, B, torch.tensor([0.5], device=META))
