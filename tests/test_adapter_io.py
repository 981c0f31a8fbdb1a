"""Adapter files under stress: values that overflow the parameter they load into, saves
stopped at every step, concurrent saves to one directory (issue 10, items 7 and 8).

The rule these tests hold lorakern to: a directory either loads as one pair that a single
save wrote (the old adapter or the new one, every value and every scaling), or the load
refuses it as a mix of two saves, with the model untouched. It never loads new weights
beside an old config silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import threading
import time
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakern
import lorakern.adapters as adapters_mod
from lorakern import LoraConfig
from lorakern.adapters import AdapterLoadError, adapter_state_dict
from lorakern.model import adapter_configs, lora_layers
from tests.test_model_helpers import assert_same_state, full_state, tiny_mlp

pytestmark = pytest.mark.usefixtures("quiet_warnings")

ST, CFG = "adapter_model.safetensors", "adapter_config.json"
LOCK = ".lorakern-save.lock"
MIX = "mix of two saves"

# Two adapters with the same shapes (so an old config fits new weights) but different alphas.
OLD = dict(r=2, lora_alpha=4, target_modules=["up", "down"], modules_to_save=["head"])
NEW = dict(OLD, lora_alpha=16)


def trained(kwargs: dict, seed: int) -> nn.Module:
    """tiny_mlp with a LoRA adapter of random (non-zero) A, B and a changed head copy."""
    model = lorakern.inject(tiny_mlp(), LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B):
                d["default"].weight.copy_(torch.randn(d["default"].weight.shape, generator=g) * 0.1)
        if kwargs.get("modules_to_save"):
            model.head.modules_to_save["default"].weight.add_(torch.randn(5, 16, generator=g))
    return model


def fingerprint(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every saved value and every layer's scaling of the adapter "default"."""
    values = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    return values, {n: layer.scaling["default"] for n, layer in lora_layers(model)}


def same(a, b) -> bool:
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1] == b[1]


def outcome(path, candidates: dict[str, tuple]) -> str:
    """Load `path` into a fresh model: the name of the candidate it loads as, or "mix" when
    the load refuses the directory as a mix. Fails when it loads as none of them."""
    try:
        loaded = lorakern.load_adapter(tiny_mlp(), path)
    except AdapterLoadError as exc:
        assert MIX in str(exc), f"refused, but not as a mix: {exc}"
        return "mix"
    got = fingerprint(loaded)
    for name, fp in candidates.items():
        if same(got, fp):
            return name
    alpha = adapter_configs(loaded)["default"].lora_alpha
    raise AssertionError(f"{path} loaded silently as a mix (lora_alpha={alpha}) of {sorted(candidates)}")


def peft_save(kwargs: dict, path, seed: int) -> None:
    """The same kind of adapter, written by PEFT itself (its files carry no lorakern record)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    pm = peft.get_peft_model(tiny_mlp(), peft.LoraConfig(**kwargs, init_lora_weights=False))
    pm.save_pretrained(path)


def write_old(writer: str, path) -> None:
    if writer == "lorakern":
        lorakern.save_adapter(trained(OLD, seed=1), path)
    else:
        peft_save(OLD, path, seed=1)


def rewrite_tensors(path, fn) -> None:
    """Edit the weights file, keeping its metadata (and so lorakern's record)."""
    with safe_open(path / ST, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path / ST)
    fn(tensors)
    save_file(tensors, path / ST, metadata=metadata)


def assert_load_fails_unchanged(model, path, match, **kwargs):
    """The load raises AdapterLoadError matching `match`; the model is exactly as before."""
    before = full_state(model)
    types = [type(m) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    configs = adapter_configs(model)
    with pytest.raises(AdapterLoadError, match=match):
        lorakern.load_adapter(model, path, **kwargs)
    assert_same_state(model, before)
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == grads
    assert adapter_configs(model) == configs


# -------------------------------------------- item 7: finiteness in the target dtype

KEY = "base_model.model."


def _half_existing():
    return lorakern.inject(tiny_mlp(), LoraConfig(**OLD)).half()


OVERFLOW_CASES = {
    # case: (target model, file key, file dtype, value, dtype it overflows)
    "fp64-1e300-into-new-fp32-lora_A": (tiny_mlp, "blocks.0.up.lora_A.weight", torch.float64, 1e300, torch.float32),
    "fp32-1e6-into-existing-fp16-lora_B": (_half_existing, "blocks.2.down.lora_B.weight", torch.float32, 1e6, torch.float16),
    "fp32-1e6-into-fp16-modules_to_save": (lambda: tiny_mlp().half(), "head.weight", torch.float32, -1e6, torch.float16),
}


@pytest.mark.parametrize("case", list(OVERFLOW_CASES))
def test_value_that_overflows_the_parameter_dtype_is_refused(tmp_path, case):
    """A value finite in the file but not in the parameter's dtype is refused (it would load
    as inf), with the key and the dtype in the message; the model is untouched."""
    make, key, dtype, value, target = OVERFLOW_CASES[case]
    lorakern.save_adapter(trained(OLD, seed=1), tmp_path)

    def poison(t):
        t[KEY + key] = t[KEY + key].to(dtype)
        t[KEY + key][1, 1] = value

    rewrite_tensors(tmp_path, poison)
    assert_load_fails_unchanged(make(), tmp_path, rf"{KEY}{key}.*overflow.*{target}")


def test_bias_that_overflows_fp16_is_refused(tmp_path):
    """bias="all" loads every bias into the base model's (here fp16) parameters."""
    kwargs = dict(r=2, target_modules=["up"], bias="all")
    lorakern.save_adapter(trained(kwargs, seed=1), tmp_path)
    rewrite_tensors(tmp_path, lambda t: t[KEY + "blocks.1.down.bias"].__setitem__(3, 7e4))
    assert_load_fails_unchanged(tiny_mlp().half(), tmp_path, r"blocks\.1\.down\.bias.*overflow.*torch\.float16")


def _as_fp64_with(key, value):
    """A rewrite_tensors edit: tensor `key` stored as fp64, its [0, 0] set to `value`."""

    def edit(t):
        t[key] = t[key].double()
        t[key][0, 0] = value

    return edit


def test_values_that_fit_the_parameter_dtype_load(tmp_path):
    """Large values that the parameter's dtype can hold load, converted; NaN is still refused."""
    lorakern.save_adapter(trained(OLD, seed=1), tmp_path)
    k = KEY + "blocks.0.up.lora_A.weight"
    rewrite_tensors(tmp_path, _as_fp64_with(k, 1e30))
    model = lorakern.load_adapter(tiny_mlp(), tmp_path)
    assert model.blocks[0].up.lora_A["default"].weight[0, 0].item() == pytest.approx(1e30, rel=1e-6)
    rewrite_tensors(tmp_path, lambda t: t[k].__setitem__((0, 1), float("nan")))
    assert_load_fails_unchanged(tiny_mlp(), tmp_path, "non-finite")


def test_overflow_in_the_final_copy_is_refused_and_rolled_back(tmp_path, monkeypatch):
    """Should the planned dtype ever differ from the parameter's (e.g. update_layer creating
    A/B in another dtype), the copy into the parameter would convert again: that overflow is
    caught too, after injection, and the load rolled back."""
    lorakern.save_adapter(trained(OLD, seed=1), tmp_path)
    k = KEY + "blocks.0.up.lora_A.weight"
    rewrite_tensors(tmp_path, _as_fp64_with(k, 1e300))
    real = adapters_mod._expected

    def expected(*args, **kwargs):  # plans fp64 for every LoRA matrix; the parameters are fp32
        exp, names = real(*args, **kwargs)
        return {ck: s._replace(dtype=torch.float64) if s.what.startswith("lora_") else s for ck, s in exp.items()}, names

    monkeypatch.setattr(adapters_mod, "_expected", expected)
    model = tiny_mlp()
    model.blocks[0].up.weight.requires_grad_(False)  # mixed flags, restored exactly
    assert_load_fails_unchanged(model, tmp_path, r"blocks\.0\.up\.lora_A\.weight.*overflow.*torch\.float32")


# --------------------------------------------------- item 8: pairs, never a mix


def test_weights_record_the_config_they_were_saved_with(tmp_path):
    """The weights file's metadata (which PEFT ignores) holds the config written beside it;
    the config file has PEFT's keys only."""
    lorakern.save_adapter(trained(NEW, seed=2), tmp_path)
    with safe_open(tmp_path / ST, "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and set(metadata) == {"format", "lorakern_config"}
    assert json.loads(metadata["lorakern_config"]) == json.loads((tmp_path / CFG).read_text())
    assert sorted(os.listdir(tmp_path)) == [CFG, ST]


@pytest.mark.parametrize("config_writer", ["lorakern", "peft"])
def test_new_weights_beside_an_old_config_are_refused(tmp_path, config_writer):
    """New weights beside the config of another save (what a save stopped between its two
    renames leaves): refused, naming the directory and what differs, model untouched."""
    write_old(config_writer, tmp_path / "old")
    lorakern.save_adapter(trained(NEW, seed=2), tmp_path / "new")
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / CFG).write_bytes((tmp_path / "old" / CFG).read_bytes())
    (mix / ST).write_bytes((tmp_path / "new" / ST).read_bytes())
    match = rf"{re.escape(str(mix))}.*{MIX}"
    for model in (tiny_mlp(), lorakern.inject(tiny_mlp(), LoraConfig(**OLD))):
        assert_load_fails_unchanged(model, mix, match)
    with pytest.raises(AdapterLoadError, match=r"lora_alpha: 16 .*4"):
        lorakern.load_adapter(tiny_mlp(), mix)
    with pytest.raises(AdapterLoadError, match=MIX):
        adapters_mod.read_adapter(mix)


def test_mix_is_named_beside_a_misfit(tmp_path):
    """A mix whose weights do not even fit the old config: the error says both."""
    lorakern.save_adapter(trained(OLD, seed=1), tmp_path / "old")
    lorakern.save_adapter(trained(dict(NEW, r=3), seed=2), tmp_path / "new")
    (tmp_path / "new" / CFG).write_bytes((tmp_path / "old" / CFG).read_bytes())
    assert_load_fails_unchanged(tiny_mlp(), tmp_path / "new", rf"{MIX}.*rank 3 in the file, r=2 in the config")


def test_pairs_that_describe_one_adapter_load(tmp_path):
    """Not a mix: weights without lorakern's record (PEFT's, or rewritten by another tool)
    beside any config; a config reformatted or given bookkeeping / unknown keys; new
    weights beside an old config that describes the same adapter (same r, alpha, targets)."""
    peft_save(NEW, tmp_path / "peft", seed=3)
    lorakern.load_adapter(tiny_mlp(), tmp_path / "peft")

    model = trained(NEW, seed=2)
    lorakern.save_adapter(model, tmp_path / "a")
    d = json.loads((tmp_path / "a" / CFG).read_text())
    d.update(base_model_name_or_path="some/model", some_future_field=1)
    (tmp_path / "a" / CFG).write_text(json.dumps(d))  # reformatted, keys added
    assert outcome(tmp_path / "a", {"new": fingerprint(model)}) == "new"

    other = trained(NEW, seed=7)  # same config, other weights
    lorakern.save_adapter(other, tmp_path / "b")
    (tmp_path / "b" / CFG).write_bytes((tmp_path / "a" / CFG).read_bytes())
    assert outcome(tmp_path / "b", {"other": fingerprint(other)}) == "other"

    stripped = tmp_path / "b"
    save_file(load_file(stripped / ST), stripped / ST, metadata={"format": "pt"})
    d["lora_alpha"] = 4  # no record: the weights cannot tell, and load as before
    (stripped / CFG).write_text(json.dumps(d))
    lorakern.load_adapter(tiny_mlp(), stripped)


def test_peft_loads_a_lorakern_adapter_without_warnings(tmp_path):
    """The record sits where PEFT does not look: PeftModel.from_pretrained loads the files
    with no warning about unexpected keys and gives lorakern's outputs."""
    peft = pytest.importorskip("peft")
    model = trained(NEW, seed=2)
    lorakern.save_adapter(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(tiny_mlp(), tmp_path)
    assert not [w for w in caught if "nexpected" in str(w.message)]
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-6)


class _Crash(BaseException):
    """The process stopping mid-save (kill -9, power loss): no `except Exception` sees it."""


@contextlib.contextmanager
def failing_save(fail_at: int | None, how: str):
    """Count the save's steps (each write, fsync, rename); make step `fail_at` (1-based)
    raise. how="error": an OSError (the save's own cleanup runs); how="crash": the process
    stops there (nothing is cleaned up: temporaries and the lock file stay)."""
    steps: list[str] = []
    real_write, real_fsync, real_replace, real_unlink = adapters_mod._write_bytes, os.fsync, os.replace, os.unlink

    def step(name):
        steps.append(name)
        if len(steps) == fail_at:
            raise (OSError(f"{name} failed (simulated)") if how == "error" else _Crash(name))

    def write(f, data):
        step(f"write {len(steps)}")
        real_write(f, data)

    def fsync(fd):
        step("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        step(f"replace {os.path.basename(dst)}")
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(adapters_mod, "_write_bytes", write)
        m.setattr(os, "fsync", fsync)
        m.setattr(os, "replace", replace)
        if how == "crash":
            m.setattr(os, "unlink", lambda *a, **k: None)
        yield steps


@pytest.mark.parametrize("how", ["error", "crash"])
@pytest.mark.parametrize("old_writer", ["lorakern", "peft"])
def test_save_stopped_at_every_step_never_loads_a_mix(tmp_path, old_writer, how):
    """Over an adapter saved by lorakern or by PEFT, a save that stops at any step leaves a
    directory that loads as the old adapter or the new one, or is refused as a mix; a later
    save then completes (and clears what a crash left behind)."""
    new = trained(NEW, seed=2)
    candidates = {"new": fingerprint(new)}
    with failing_save(None, how) as steps:
        lorakern.save_adapter(new, tmp_path / "probe")
    assert {f"replace {ST}", f"replace {CFG}", "fsync dir"} <= set(steps) and len(steps) >= 7, steps

    outcomes = {}
    for k, name in enumerate(steps, start=1):
        d = tmp_path / f"step{k}"
        write_old(old_writer, d)
        candidates["old"] = fingerprint(lorakern.load_adapter(tiny_mlp(), d))
        with contextlib.suppress(OSError, _Crash), failing_save(k, how):
            lorakern.save_adapter(new, d)
        outcomes[name] = outcome(d, candidates)
        lorakern.save_adapter(new, d)  # the next save repairs it
        assert outcome(d, candidates) == "new"
        assert not [f for f in os.listdir(d) if f.startswith(".")], os.listdir(d)
    assert outcomes[f"replace {CFG}"] == "mix", outcomes  # new weights, old config: refused
    assert outcomes[steps[0]] == "old" and outcomes[f"replace {ST}"] == "old", outcomes


def test_concurrent_saves_to_one_directory_leave_one_pair(tmp_path, monkeypatch):
    """Two threads save different adapters (alpha, weights) to one directory, 20 rounds:
    after every round the directory loads as one of them, and the saves never interleave
    (each weights rename is followed by the same save's config rename)."""
    models = {"a": trained(OLD, seed=1), "b": trained(NEW, seed=2)}
    candidates = {name: fingerprint(m) for name, m in models.items()}
    renames: list[tuple[int, str]] = []
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        renames.append((threading.get_ident(), os.path.basename(dst)))
        if os.path.basename(dst) == ST and sum(name == ST for _, name in renames) % 2:
            # The first weights rename of a round waits longest: unserialised, the other
            # save would rename both its files meanwhile and this config would land last.
            time.sleep(0.01)

    monkeypatch.setattr(os, "replace", replace)
    seen = set()
    for _ in range(20):
        barrier, errors = threading.Barrier(2), []

        def save(model):
            try:
                barrier.wait()
                lorakern.save_adapter(model, tmp_path)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(m,)) for m in models.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        seen.add(outcome(tmp_path, candidates))
    assert seen <= {"a", "b"}
    for (t1, first), (t2, second) in zip(renames[::2], renames[1::2]):
        assert (first, second) == (ST, CFG) and t1 == t2, renames
    assert sorted(os.listdir(tmp_path)) == [CFG, ST]


def test_save_without_fcntl_skips_the_lock(tmp_path, monkeypatch):
    """Where fcntl is missing (not POSIX) the save takes no lock and still writes the pair."""
    monkeypatch.setattr(adapters_mod, "fcntl", None)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (opened.append(os.fspath(p)), real_open(p, *a, **k))[1])
    model = trained(NEW, seed=2)
    lorakern.save_adapter(model, tmp_path)
    assert not [p for p in opened if p.endswith(LOCK)]
    assert outcome(tmp_path, {"new": fingerprint(model)}) == "new"
