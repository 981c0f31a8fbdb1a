"""LoraConfig refuses fields of the wrong type or with invalid regexes, naming the field
(issue 10, item 11): a JSON string "false" must not switch rsLoRA on."""

from __future__ import annotations

import json

import pytest
import torch

import lorakern


@pytest.mark.parametrize("field,value", [
    ("use_rslora", "false"), ("use_rslora", 1), ("fan_in_fan_out", "true"), ("fan_in_fan_out", None),
])
def test_bool_fields_must_be_bool(field, value):
    with pytest.raises(TypeError, match=field):
        lorakern.LoraConfig(**{field: value})


@pytest.mark.parametrize("kwargs,field", [
    (dict(lora_dropout=True), "lora_dropout"),
    (dict(lora_dropout="0.1"), "lora_dropout"),
    (dict(r="8"), "r"),
    (dict(lora_alpha="16"), "lora_alpha"),
    (dict(bias=["none"]), "bias"),
    (dict(rank_pattern=[("q", 4)]), "rank_pattern"),
    (dict(alpha_pattern="q"), "alpha_pattern"),
    (dict(modules_to_save="classifier"), "modules_to_save"),
    (dict(layers_pattern=3, layers_to_transform=[0], target_modules=["q"]), "layers_pattern"),
])
def test_fields_of_the_wrong_type_are_refused(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        lorakern.LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(modules_to_save=["cls["]), "modules_to_save"),
    (dict(layers_pattern="lay(", layers_to_transform=[0], target_modules=["q"]), "layers_pattern"),
    (dict(target_modules="q_proj(("), "target_modules"),
    (dict(rank_pattern={"q[": 4}), "rank_pattern"),
])
def test_invalid_regex_is_a_value_error_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=f"{field}.*not a valid regex"):
        lorakern.LoraConfig(**kwargs)


def test_string_bool_in_adapter_config_json_is_refused(tmp_path):
    """An adapter_config.json with "use_rslora": "false" used to load with rsLoRA on
    (scaling 4.0 instead of 2.0)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    cfg = lorakern.LoraConfig(r=4, lora_alpha=8, target_modules=["0"])
    lorakern.inject(model, cfg)
    lorakern.save_adapter(model, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    d = json.loads(config_file.read_text())
    d["use_rslora"] = "false"
    config_file.write_text(json.dumps(d))
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises((TypeError, ValueError), match="use_rslora"):
        lorakern.load_adapter(fresh, tmp_path / "a")
    assert fresh.state_dict().keys() == before.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_deeply_nested_adapter_config_is_a_clear_error(tmp_path):
    """A hostile adapter_config.json nested 100k levels deep: AdapterLoadError, not RecursionError."""
    d = tmp_path / "deep"
    d.mkdir()
    (d / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="nested too deeply"):
        lorakern.load_adapter(model, d)
