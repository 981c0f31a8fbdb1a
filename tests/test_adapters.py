"""Adapter files: PEFT's format, round trips, atomic saves, and loads that fail cleanly.

Every failing load is checked to leave the model exactly as before (whole state dict,
module types, requires_grad flags, the global RNG)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakern
import lorakern.adapters as adapters_mod
from lorakern import LoraConfig
from lorakern.adapters import AdapterLoadError
from lorakern.model import ModulesToSave, adapter_configs, adapter_state, lora_layers
from tests.test_model_helpers import assert_same_state, full_state, input_ids, logits, tiny_mlp
from tests.utils import RTOL, assert_close

pytestmark = pytest.mark.usefixtures("quiet_warnings")

TOL = RTOL[torch.float32]
ST, CFG = "adapter_model.safetensors", "adapter_config.json"


def trained(base, config, adapter_name="default", seed=0):
    model = lorakern.inject(copy.deepcopy(base), config, adapter_name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B):
                d[adapter_name].weight.copy_(torch.randn(d[adapter_name].weight.shape, generator=g) * 0.1)
    return model


CONFIG = LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"up_proj": 2},
    alpha_pattern={"layers.0.self_attn.v_proj": 5}, modules_to_save=["lm_head"],
)


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    """A lorakern adapter on disk and the logits it gives."""
    path = tmp_path_factory.mktemp("adapter")
    model = trained(llama, CONFIG)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.2)
    lorakern.save_adapter(model, path)
    return path, logits(model, input_ids())


def copy_dir(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# ------------------------------------------------------------------------------ format


def test_files_keys_shapes_metadata(saved):
    path, _ = saved
    assert sorted(os.listdir(path)) == [CFG, ST]
    with safe_open(path / ST, "pt") as f:
        assert f.metadata()["format"] == "pt" and set(f.metadata()) == {"format", "lorakern_config"}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    P = "base_model.model.model.layers"
    expected = {"base_model.model.lm_head.weight": (128, 64)}
    for i in range(2):
        expected[f"{P}.{i}.self_attn.q_proj.lora_A.weight"] = (4, 64)
        expected[f"{P}.{i}.self_attn.q_proj.lora_B.weight"] = (64, 4)
        expected[f"{P}.{i}.self_attn.v_proj.lora_A.weight"] = (4, 64)
        expected[f"{P}.{i}.self_attn.v_proj.lora_B.weight"] = (64, 4)
        expected[f"{P}.{i}.mlp.up_proj.lora_A.weight"] = (2, 64)
        expected[f"{P}.{i}.mlp.up_proj.lora_B.weight"] = (128, 2)
    assert shapes == expected


def test_config_json_sorted_indented_no_scaling(saved):
    path, _ = saved
    text = (path / CFG).read_text()
    d = json.loads(text)
    assert list(d) == sorted(d) and text.startswith("{\n  \"")
    assert d["peft_type"] == "LORA" and d["r"] == 4 and d["lora_alpha"] == 8
    assert d["rank_pattern"] == {"up_proj": 2} and d["alpha_pattern"] == {"layers.0.self_attn.v_proj": 5}
    assert d["target_modules"] == ["q_proj", "up_proj", "v_proj"] and d["modules_to_save"] == ["lm_head"]
    assert "scaling" not in text


def test_round_trip_into_fresh_model(llama, saved):
    path, ref = saved
    rng = torch.get_rng_state()
    model = lorakern.load_adapter(copy.deepcopy(llama), path)
    assert torch.equal(torch.get_rng_state(), rng), "loading does not consume the caller's RNG"
    assert_close(logits(model, input_ids()), ref, TOL, "logits")
    assert lorakern.trainable_parameters(model)[0] == 0, "is_trainable=False loads frozen"
    scalings = {n: layer.scaling["default"] for n, layer in lora_layers(model)}
    assert scalings["model.layers.0.self_attn.v_proj"] == 5 / 4 and scalings["model.layers.1.mlp.up_proj"] == 8 / 2
    lorakern.set_adapter(model, "default")
    assert lorakern.trainable_parameters(model)[0] == 0, "stays frozen after set_adapter"


def test_load_trainable_and_into_existing_adapter(llama, saved):
    path, ref = saved
    model = lorakern.load_adapter(copy.deepcopy(llama), path, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A.default" in n for n in trainable) and "lm_head.modules_to_save.default.weight" in trainable
    # Same config injected fresh, then loaded into the existing adapter: weights replaced.
    other = lorakern.inject(copy.deepcopy(llama), copy.deepcopy(CONFIG))
    lorakern.load_adapter(other, path, is_trainable=True)
    assert_close(logits(other, input_ids()), ref, TOL, "loaded into the existing adapter")


def test_second_adapter_name_and_mlp_round_trip(tmp_path):
    base = tiny_mlp()
    model = trained(base, LoraConfig(r=3, target_modules=["up", "head"], bias="all"))
    lorakern.inject(model, LoraConfig(r=2, target_modules=["down"], bias="lora_only"), adapter_name="two")
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if "two" in layer.lora_B:
                layer.lora_B["two"].weight.normal_()
        model.head.base_layer.bias.add_(0.5)  # bias="all": biases are part of the adapter
    lorakern.save_adapter(model, tmp_path / "a")
    lorakern.save_adapter(model, tmp_path / "b", adapter_name="two")
    keys_a = set(load_file(tmp_path / "a" / ST))
    assert "base_model.model.head.base_layer.bias" in keys_a and "base_model.model.blocks.0.down.base_layer.bias" in keys_a  # down is a LoRA layer (of "two")
    assert set(load_file(tmp_path / "b" / ST)) == {
        f"base_model.model.blocks.{i}.down.{k}" for i in range(3) for k in ("lora_A.weight", "lora_B.weight", "base_layer.bias")
    }
    x = torch.randn(4, 16)
    lorakern.set_adapter(model, ["default", "two"])
    ref = model(x)
    fresh = lorakern.load_adapter(tiny_mlp(), tmp_path / "a")
    lorakern.load_adapter(fresh, tmp_path / "b", adapter_name="two")
    lorakern.set_adapter(fresh, ["default", "two"])
    assert_close(fresh(x), ref, TOL, "two adapters")


class _RelativeBias(nn.Module):
    """A T5-like module: an embedding table whose name contains "bias" beside a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.relative_attention_bias = nn.Embedding(8, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, idx):
        return self.proj(self.relative_attention_bias(idx))


def test_bias_all_takes_parameters_named_bias_only(tmp_path):
    """bias="all" saves parameters named `bias` (PEFT: name == "bias" or name.endswith(".bias")),
    not `relative_attention_bias.weight`; and a file with PEFT's keys loads."""
    model = trained(_RelativeBias(), LoraConfig(r=2, target_modules=["proj"], bias="all"))
    with torch.no_grad():
        model.proj.base_layer.bias.add_(0.5)
    lorakern.save_adapter(model, tmp_path)
    assert set(load_file(tmp_path / ST)) == {
        "base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight", "base_model.model.proj.base_layer.bias",
    }
    loaded = lorakern.load_adapter(_RelativeBias(), tmp_path)
    idx = torch.arange(8)
    assert_close(loaded(idx), model(idx), TOL, "bias='all' round trip")


def test_legacy_bin_is_read_with_weights_only(llama, saved, tmp_path):
    path, ref = saved
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / CFG).write_bytes((path / CFG).read_bytes())
    torch.save(load_file(path / ST), legacy / "adapter_model.bin")
    model = lorakern.load_adapter(copy.deepcopy(llama), legacy)
    assert_close(logits(model, input_ids()), ref, TOL, "legacy .bin")


class _Evil:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/lorakern_pwned_should_not_exist",))


def test_legacy_bin_never_unpickles_objects(llama, saved, tmp_path):
    path, _ = saved
    d = tmp_path / "evil"
    d.mkdir()
    (d / CFG).write_bytes((path / CFG).read_bytes())
    with open(d / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    model = copy.deepcopy(llama)
    before = full_state(model)
    with pytest.raises(AdapterLoadError, match="weights_only"):
        lorakern.load_adapter(model, d)
    assert not os.path.exists("/tmp/lorakern_pwned_should_not_exist")
    assert_same_state(model, before)


# ------------------------------------------------------------------- loads that must fail


def _assert_load_fails(model, path, exc, match, **kwargs):
    """The load raises `exc` matching `match` and leaves the model exactly as it was."""
    before = full_state(model)
    types = [type(m) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    configs = adapter_configs(model)
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=match):
        lorakern.load_adapter(model, path, **kwargs)
    assert_same_state(model, before)
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == grads
    assert adapter_configs(model) == configs
    assert torch.equal(torch.get_rng_state(), rng)


def _edit_tensors(path, fn):
    tensors = load_file(path / ST)
    fn(tensors)
    save_file(tensors, path / ST, metadata={"format": "pt"})


def _edit_config(path, fn):
    d = json.loads((path / CFG).read_text())
    fn(d)
    (path / CFG).write_text(json.dumps(d))


@pytest.fixture(params=["fresh", "with-other-adapter"])
def target_model(request, llama):
    """A base model, or one that already carries another adapter (so failures must not touch it either)."""
    model = copy.deepcopy(llama)
    if request.param == "with-other-adapter":
        model = trained(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), adapter_name="other")
    return model


def test_missing_directory_and_files(target_model, saved, tmp_path):
    path, _ = saved
    _assert_load_fails(target_model, tmp_path / "nope", FileNotFoundError, "does not exist")
    d = copy_dir(path, tmp_path / "no_weights")
    os.remove(d / ST)
    _assert_load_fails(target_model, d, FileNotFoundError, "adapter_model.safetensors or adapter_model.bin")
    d = copy_dir(path, tmp_path / "no_config")
    os.remove(d / CFG)
    _assert_load_fails(target_model, d, FileNotFoundError, "adapter_config.json")


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "bad-header-length"])
def test_corrupt_safetensors(target_model, saved, tmp_path, corruption):
    path, _ = saved
    d = copy_dir(path, tmp_path / corruption)
    data = (d / ST).read_bytes()
    if corruption == "truncated":
        data = data[: len(data) // 2]
    elif corruption == "garbage":
        data = os.urandom(len(data))
    else:
        data = (2**40).to_bytes(8, "little") + data[8:]
    (d / ST).write_bytes(data)
    _assert_load_fails(target_model, d, AdapterLoadError, "not a readable safetensors file")


def test_corrupt_config_json(target_model, saved, tmp_path):
    d = copy_dir(saved[0], tmp_path / "badjson")
    (d / CFG).write_text("{ not json")
    _assert_load_fails(target_model, d, AdapterLoadError, "not valid JSON")


def test_wrong_shape_names_module_and_shapes(target_model, saved, tmp_path):
    d = copy_dir(saved[0], tmp_path / "shape")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _edit_tensors(d, lambda t: t.__setitem__(key, torch.zeros(64, 3)))
    _assert_load_fails(
        target_model, d, AdapterLoadError,
        r"'model\.layers\.1\.self_attn\.v_proj' lora_B: expected shape \[64, 4\], found \[64, 3\]",
    )


def test_rank_in_config_disagrees_with_file(target_model, saved, tmp_path):
    d = copy_dir(saved[0], tmp_path / "rank")
    _edit_config(d, lambda c: c.__setitem__("r", 6))
    _assert_load_fails(target_model, d, AdapterLoadError, r"rank 4 in the file, r=6 in the config")


def test_alpha_disagrees_with_existing_adapter(llama, saved, tmp_path):
    model = lorakern.inject(copy.deepcopy(llama), copy.deepcopy(CONFIG))
    d = copy_dir(saved[0], tmp_path / "alpha")
    _edit_config(d, lambda c: c.__setitem__("lora_alpha", 16))
    _assert_load_fails(model, d, AdapterLoadError, r"lora_alpha=8.*lora_alpha=16")


def test_missing_and_unexpected_keys(target_model, saved, tmp_path):
    d = copy_dir(saved[0], tmp_path / "missing")
    gone = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    _edit_tensors(d, lambda t: t.pop(gone))
    _assert_load_fails(target_model, d, AdapterLoadError, "missing keys.*layers.0.mlp.up_proj.lora_A")
    d = copy_dir(saved[0], tmp_path / "unexpected")
    _edit_tensors(d, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight", torch.zeros(4, 64)))
    _assert_load_fails(target_model, d, AdapterLoadError, "unexpected keys.*gate_proj")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(target_model, saved, tmp_path, bad):
    d = copy_dir(saved[0], tmp_path / "nan")
    key = "base_model.model.lm_head.weight"

    def poison(t):
        t[key][3, 5] = bad

    _edit_tensors(d, poison)
    _assert_load_fails(target_model, d, AdapterLoadError, "non-finite")


def test_other_peft_type_and_unsupported_features(target_model, saved, tmp_path):
    d = copy_dir(saved[0], tmp_path / "ia3")
    _edit_config(d, lambda c: c.__setitem__("peft_type", "IA3"))
    _assert_load_fails(target_model, d, AdapterLoadError, "peft_type 'IA3'")
    d = copy_dir(saved[0], tmp_path / "layer_replication")
    _edit_config(d, lambda c: c.__setitem__("layer_replication", [[0, 1], [0, 1]]))
    _assert_load_fails(target_model, d, AdapterLoadError, "layer_replication=")


def test_config_that_matches_nothing(target_model, saved, tmp_path):
    d = copy_dir(saved[0], tmp_path / "nomatch")
    _edit_config(d, lambda c: c.__setitem__("target_modules", ["query"]))
    _assert_load_fails(target_model, d, AdapterLoadError, "matched no module")


def test_unknown_config_keys_warn_and_load(llama, saved, tmp_path):
    d = copy_dir(saved[0], tmp_path / "unknown")
    _edit_config(d, lambda c: c.update(some_future_field=3, another=None))
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['another', 'some_future_field'\]"):
        model = lorakern.load_adapter(copy.deepcopy(llama), d)
    assert_close(logits(model, input_ids()), saved[1], TOL, "logits")


def test_adapter_name_taken_by_other_config(llama, saved):
    model = lorakern.inject(copy.deepcopy(llama), LoraConfig(target_modules=["k_proj"]))
    _assert_load_fails(model, saved[0], AdapterLoadError, "different modules")


# ------------------------------------------- loads that fail after validation (OOM, ^C)


def _fail_nth_parameter_copy(monkeypatch, n, exc):
    """Make the n-th `copy_` into an nn.Parameter raise `exc`: load_adapter writes every value
    that way, so this is a failure after validation, partway through writing."""
    real = torch.Tensor.copy_
    calls = []

    def copy_(self, *args, **kwargs):
        if isinstance(self, nn.Parameter):
            calls.append(1)
            if len(calls) == n:
                raise exc("out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc("out of memory (simulated)")

    return fail


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt], ids=["oom", "interrupt"])
@pytest.mark.parametrize("fail_at", ["second-write", "last-write", "set_adapter"])
def test_failure_while_loading_into_existing_adapter_rolls_back(llama, saved, monkeypatch, fail_at, exc):
    """LoRA A/B and the modules_to_save copy of an existing adapter are overwritten in place:
    a failure partway must put back every old value (and the trainable flags)."""
    path, _ = saved
    model = trained(llama, CONFIG, seed=5)  # trainable; the load below makes it inference-only
    inference = set(adapter_state(model).inference)
    if fail_at == "set_adapter":  # after every value was written
        monkeypatch.setattr(adapters_mod, "set_adapter", _raise(exc))
    else:
        n = 2 if fail_at == "second-write" else len(load_file(path / ST))
        _fail_nth_parameter_copy(monkeypatch, n, exc)
    _assert_load_fails(model, path, exc, "simulated", is_trainable=False)
    assert adapter_state(model).inference == inference


MLP_CONFIG = LoraConfig(r=2, target_modules=["up", "down"], bias="all", modules_to_save=["head"])


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    """An MLP adapter that exercises every kind of value: LoRA, biases, a saved module."""
    path = tmp_path_factory.mktemp("mlp_adapter")
    model = trained(tiny_mlp(), MLP_CONFIG, seed=3)
    with torch.no_grad():
        model.blocks[1].up.base_layer.bias.add_(0.5)
        model.head.modules_to_save["default"].weight.mul_(1.5)
    lorakern.save_adapter(model, path)
    return path


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt], ids=["oom", "interrupt"])
@pytest.mark.parametrize("fail_at", ["first-write", "last-write", "injection"])
@pytest.mark.parametrize("base", ["fresh", "with-other-adapter"])
def test_failure_while_loading_new_adapter_rolls_back(saved_mlp, monkeypatch, base, fail_at, exc):
    """A new adapter is injected first (base frozen, modules wrapped, originals frozen, biases
    marked trainable), then written: a failure at any point must undo all of it, including
    a half-done injection."""
    model = tiny_mlp()
    if base == "fresh":
        model.blocks[0].up.weight.requires_grad_(False)  # mixed flags, restored exactly
    else:  # "up" is a LoraLinear already: the new adapter goes into an existing layer
        lorakern.inject(model, LoraConfig(r=3, target_modules=["up"]), adapter_name="other")
    if fail_at == "injection":  # the LoRA layers are in place, the head is not wrapped yet
        monkeypatch.setattr(ModulesToSave, "update", _raise(exc))
    else:
        n = 1 if fail_at == "first-write" else len(load_file(saved_mlp / ST))
        _fail_nth_parameter_copy(monkeypatch, n, exc)
    _assert_load_fails(model, saved_mlp, exc, "simulated", adapter_name="new", is_trainable=True)
    assert hasattr(model, "_lorakern") == (base != "fresh")


# ------------------------------------------------------------------------- atomic saves


def _snapshot(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


@pytest.mark.parametrize("fail_on_write", [1, 2])
def test_interrupted_save_keeps_previous_adapter(llama, tmp_path, monkeypatch, fail_on_write):
    """An exception in the middle of writing the weights (1) or the config (2) leaves the
    previous adapter byte for byte, and no temporary file behind."""
    first = trained(llama, LoraConfig(r=2, target_modules=["q_proj"]), seed=1)
    lorakern.save_adapter(first, tmp_path)
    before = _snapshot(tmp_path)

    second = trained(llama, LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj"]), seed=2)
    writes = []
    real = adapters_mod._write_bytes

    def failing(f, data):
        writes.append(1)
        if len(writes) == fail_on_write:
            f.write(data[: len(data) // 2])
            raise OSError("disk full (simulated)")
        real(f, data)

    monkeypatch.setattr(adapters_mod, "_write_bytes", failing)
    with pytest.raises(OSError, match="simulated"):
        lorakern.save_adapter(second, tmp_path)
    assert _snapshot(tmp_path) == before
    monkeypatch.setattr(adapters_mod, "_write_bytes", real)
    loaded = lorakern.load_adapter(copy.deepcopy(llama), tmp_path)
    assert_close(logits(loaded, input_ids()), logits(first, input_ids()), TOL, "previous adapter still loads")
    # And a save that is not interrupted replaces both files.
    lorakern.save_adapter(second, tmp_path)
    assert json.loads((tmp_path / CFG).read_text())["r"] == 3 and sorted(os.listdir(tmp_path)) == [CFG, ST]


def test_save_replaces_weights_then_config_then_syncs_dir(tmp_path, monkeypatch):
    """Both temporaries are fsynced before either rename; the weights are renamed first and
    the config last, so a crash between the two leaves new weights beside the old config,
    never the reverse; the directory is fsynced after the renames."""
    model = trained(tiny_mlp(), LoraConfig(r=2, target_modules=["up"]))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace {os.path.basename(dst)}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    lorakern.save_adapter(model, tmp_path)
    assert events == ["fsync file", "fsync file", f"replace {ST}", f"replace {CFG}", "fsync dir"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)], ids=oct)
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    """Saved files get the mode a plain open() gives (as PEFT's do), not mkstemp's 0o600."""
    model = trained(tiny_mlp(), LoraConfig(r=2, target_modules=["up"]))
    old = os.umask(umask)
    adapters_mod._file_mode.cache_clear()  # the umask is read once and cached
    try:
        lorakern.save_adapter(model, tmp_path / "a")
    finally:
        os.umask(old)
        adapters_mod._file_mode.cache_clear()
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "a" / name).st_mode) for name in os.listdir(tmp_path / "a")}
    assert modes == {CFG: mode, ST: mode}


def test_save_unknown_adapter(llama, tmp_path):
    model = lorakern.inject(copy.deepcopy(llama), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        lorakern.save_adapter(model, tmp_path, adapter_name="nope")
    assert not os.listdir(tmp_path)


def test_bf16_model_fp32_adapters_round_trip(llama, tmp_path):
    base = copy.deepcopy(llama).to(torch.bfloat16)
    model = trained(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    model.train()
    loss = model(input_ids=input_ids(), labels=input_ids()).loss
    loss.backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    model.eval()
    lorakern.save_adapter(model, tmp_path)
    with safe_open(tmp_path / ST, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    again = lorakern.load_adapter(copy.deepcopy(llama).to(torch.bfloat16), tmp_path)
    assert torch.equal(logits(again, input_ids()), logits(model, input_ids()))
