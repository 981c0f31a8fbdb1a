"""`lorakern merge` / `lorakern inspect`: merging a PEFT adapter into a sharded Hugging Face
safetensors checkpoint, checked against PEFT's merge_and_unload() + save_pretrained, and
the adapter table. Tiny models built from configs, saved to temp dirs (CPU)."""

from __future__ import annotations

import json
import math
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lorakern import checkpoint_merge as cm  # noqa: E402
from lorakern import cli  # noqa: E402

SHARD = "100KB"  # the tiny Llama (~340 KB in fp32) is written as 4 shards


def _llama_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return LlamaConfig(**base)


def _save_base(model, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size=SHARD)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # stands for the tokenizer files
    return path


def _peft_adapter(base_dir: Path, model_cls, path: Path, **lora_kw) -> Path:
    """A PEFT LoRA over the checkpoint in base_dir, non-zero deltas (init_lora_weights=False),
    saved with PEFT's save_pretrained; the trainable tensors besides A and B (modules_to_save
    copies, biases with bias="all" / "lora_only") perturbed so that they differ from the base."""
    torch.manual_seed(1)
    model = get_peft_model(model_cls.from_pretrained(base_dir), PeftLoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def _peft_merged(base_dir: Path, adapter_dir: Path, model_cls, path: Path):
    merged = PeftModel.from_pretrained(model_cls.from_pretrained(base_dir), adapter_dir).merge_and_unload()
    merged.save_pretrained(path, max_shard_size=SHARD)
    return merged


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _header(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def _no_leftovers(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if "lorakern-merge" in p.name or "lorakern-old" in p.name]
    assert left == [], left


LLAMA_LORA = dict(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
    rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3},
    modules_to_save=["lm_head"],
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = _save_base(LlamaForCausalLM(_llama_config()), root / "base")
    adapter = _peft_adapter(base, LlamaForCausalLM, root / "adapter", **LLAMA_LORA)
    ref = _peft_merged(base, adapter, LlamaForCausalLM, root / "peft-merged")
    return root, base, adapter, ref


# ---- merge == PEFT -------------------------------------------------------------------------


def test_merge_equals_peft_merge_and_unload(llama, capsys):
    root, base, adapter, ref = llama
    out = root / "out"
    assert cli.main(["merge", str(base), str(adapter), str(out)]) == 0
    captured = capsys.readouterr()
    assert "4 shard(s), 8 tensor(s) merged" in captured.out and "1 replaced whole" in captured.out
    assert "lorakern merge" in captured.err and "4/4" in captured.err  # the progress bar, one tick per shard

    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 2
    # Same files: shards under the same names, the index and the other files copied byte for byte.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    # Same headers: tensor order, offsets, dtypes, metadata; and the same sizes.
    for name in shards:
        assert _header(out / name) == _header(base / name), name
        assert (out / name).stat().st_size == (base / name).stat().st_size
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in cm.read_checkpoint(out).tensors.values())

    # Every tensor equals PEFT's merge: bit for bit, as the delta is computed in PEFT's order
    # ((B @ A) * scaling in fp32, added to the fp32 weight).
    ours, theirs, before = _tensors(out), _tensors(root / "peft-merged"), _tensors(base)
    assert set(ours) == set(theirs) == set(before)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == before[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    changed = {k for k in ours if not torch.equal(ours[k], before[k])}
    expected = {f"model.layers.{i}.{m}.weight" for i in (0, 1)
                for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")}
    assert changed == expected | {"lm_head.weight"}

    model = LlamaForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_merge_follows_rank_and_alpha_patterns_and_rslora(tmp_path):
    """The delta of each module, from the file's A and B and the scaling the config gives it
    (rsLoRA: alpha / sqrt(r)), is exactly what merge adds."""
    torch.manual_seed(2)
    base = _save_base(LlamaForCausalLM(_llama_config()), tmp_path / "base")
    adapter = _peft_adapter(base, LlamaForCausalLM, tmp_path / "adapter", r=4, lora_alpha=6, use_rslora=True,
                            target_modules=["k_proj", "up_proj"], rank_pattern={"up_proj": 3},
                            alpha_pattern={"layers.0.self_attn.k_proj": 10})
    ref = _peft_merged(base, adapter, LlamaForCausalLM, tmp_path / "peft-merged")
    assert cli.main(["merge", "--quiet", str(base), str(adapter), str(tmp_path / "out")]) == 0
    ours, before = _tensors(tmp_path / "out"), _tensors(base)
    lora = load_file(adapter / "adapter_model.safetensors")
    for module, r, alpha in (("model.layers.0.self_attn.k_proj", 4, 10), ("model.layers.1.self_attn.k_proj", 4, 6),
                             ("model.layers.0.mlp.up_proj", 3, 6), ("model.layers.1.mlp.up_proj", 3, 6)):
        A = lora[f"base_model.model.{module}.lora_A.weight"]
        B = lora[f"base_model.model.{module}.lora_B.weight"]
        assert A.shape[0] == r
        want = before[f"{module}.weight"] + (B @ A) * (alpha / math.sqrt(r))
        assert torch.equal(ours[f"{module}.weight"], want), module
    for key, value in ref.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores [in, out]: the delta goes in transposed (attn.c_proj is square,
    so only the config's fan_in_fan_out, which PEFT writes as true, tells)."""
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    base = _save_base(GPT2LMHeadModel(cfg), tmp_path / "base")
    assert len(list(base.glob("*.safetensors"))) >= 2
    adapter = _peft_adapter(base, GPT2LMHeadModel, tmp_path / "adapter", r=4, lora_alpha=16,
                            target_modules=["c_attn", "c_proj", "c_fc"])
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ref = _peft_merged(base, adapter, GPT2LMHeadModel, tmp_path / "peft-merged")
    out = tmp_path / "out"
    assert cli.main(["merge", "--quiet", str(base), str(adapter), str(out)]) == 0
    ours, theirs, before = _tensors(out), _tensors(tmp_path / "peft-merged"), _tensors(base)
    assert set(ours) == set(before)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert not torch.equal(ours["transformer.h.0.attn.c_proj.weight"], before["transformer.h.0.attn.c_proj.weight"])
    model = GPT2LMHeadModel.from_pretrained(out)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)

    # The same adapter with fan_in_fan_out=false in its config does not fit: refused, naming
    # a tensor that fits only transposed.
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    cfg_json = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg_json, "fan_in_fan_out": False}))
    with pytest.raises(cm.MergeError, match=r"fits transposed.*fan_in_fan_out=false"):
        cm.plan_merge(base, bad)


@pytest.mark.parametrize("case", ["llama-lora_only", "gpt2-all"])
def test_trained_biases_replace_the_checkpoint_biases(tmp_path, case):
    """bias="lora_only" saves `<layer>.base_layer.bias` (the checkpoint's `<layer>.bias`);
    bias="all" every bias, and for a modules_to_save module also its wrapper's duplicates
    (`.modules_to_save.bias`, `.original_module.bias`), which merge_and_unload drops."""
    torch.manual_seed(9)
    if case.startswith("llama"):
        cls, model = LlamaForCausalLM, LlamaForCausalLM(_llama_config(attention_bias=True))
        kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], bias="lora_only")
        biases = {f"model.layers.{i}.self_attn.{m}.bias" for i in (0, 1) for m in ("q_proj", "v_proj")}
    else:
        cls, model = GPT2LMHeadModel, GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4))
        kw = dict(r=2, lora_alpha=4, target_modules=["c_attn"], bias="all", modules_to_save=["c_fc"])
        biases = {k for k, _ in model.named_parameters() if k.endswith(".bias")}
    base = _save_base(model, tmp_path / "base")
    adapter = _peft_adapter(base, cls, tmp_path / "adapter", **kw)
    saved = set(load_file(adapter / "adapter_model.safetensors"))
    if case.startswith("gpt2"):
        assert "base_model.model.transformer.h.0.mlp.c_fc.original_module.bias" in saved
    ref = PeftModel.from_pretrained(cls.from_pretrained(base), adapter).merge_and_unload()
    report = cm.merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert biases <= set(report.replaced)
    ours, before = _tensors(tmp_path / "out"), _tensors(base)
    for key in biases:
        assert not torch.equal(ours[key], before[key]), key
    for key, value in ref.state_dict().items():
        if key in ours:  # GPT-2's lm_head.weight is tied to wte and not stored
            assert torch.equal(ours[key], value), key


def test_bf16_checkpoint_sums_in_fp32_and_casts_once(tmp_path):
    torch.manual_seed(4)
    base = _save_base(LlamaForCausalLM(_llama_config()).to(torch.bfloat16), tmp_path / "base")
    adapter = _peft_adapter(base, LlamaForCausalLM, tmp_path / "adapter", r=4, lora_alpha=8,
                            target_modules=["q_proj", "gate_proj"], modules_to_save=["lm_head"])
    lora = load_file(adapter / "adapter_model.safetensors")
    assert lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.float32
    assert lora["base_model.model.lm_head.weight"].dtype == torch.bfloat16
    assert cli.main(["merge", "--quiet", str(base), str(adapter), str(tmp_path / "out")]) == 0
    ours, before = _tensors(tmp_path / "out"), _tensors(base)
    for key in ours:
        assert ours[key].dtype == torch.bfloat16, key
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        A = lora[f"base_model.model.{module}.lora_A.weight"]
        B = lora[f"base_model.model.{module}.lora_B.weight"]
        want = (before[f"{module}.weight"].float() + (B @ A) * 2.0).to(torch.bfloat16)
        assert torch.equal(ours[f"{module}.weight"], want), module
    assert torch.equal(ours["lm_head.weight"], lora["base_model.model.lm_head.weight"])
    # PEFT's merge_and_unload adds its fp32 delta into the bf16 weight in place (computed in
    # fp32, rounded once), so it agrees bit for bit here too.
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_adapter_with_saved_embedding_layers(tmp_path):
    """A LoRA on lm_head makes PEFT save the targeted embedding layer's base weight with the
    adapter (save_embedding_layers="auto"): `lm_head.base_layer.weight`; with a resized
    vocabulary it also saves `model.embed_tokens.weight` (added by hand here, same shape).
    PEFT loads them into the base model before merging; so does merge (the lm_head delta goes
    on top of the file's lm_head weight). Edited so that the file's values differ from the
    checkpoint's."""
    torch.manual_seed(8)
    base = _save_base(LlamaForCausalLM(_llama_config()), tmp_path / "base")
    saved = _peft_adapter(base, LlamaForCausalLM, tmp_path / "saved", r=2, lora_alpha=4,
                          target_modules=["q_proj", "lm_head"])
    tensors = load_file(saved / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in tensors
    tensors["base_model.model.lm_head.base_layer.weight"] += 0.25
    tensors["base_model.model.model.embed_tokens.weight"] = _tensors(base)["model.embed_tokens.weight"] + 0.25
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((saved / "adapter_config.json").read_bytes())
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})

    report = cm.merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert sorted(report.replaced) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert "lm_head.weight" in report.merged
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    ours, before = _tensors(tmp_path / "out"), _tensors(base)
    assert torch.equal(ours["model.embed_tokens.weight"], before["model.embed_tokens.weight"] + 0.25)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours[key], value), key
    kinds = {w["tensor"]: w["kind"] for w in cm.inspect_adapter(adapter)["replaced_tensors"]}
    assert kinds == {"lm_head.weight": "base weight", "model.embed_tokens.weight": "base weight"}


def test_merge_in_row_blocks_is_the_same_merge(llama, tmp_path, monkeypatch):
    """A tiny MERGE_BLOCK_BYTES (2 rows of 128 fp32 at a time) gives the same tensors as one
    block, and holds less at once."""
    root, base, adapter, _ = llama
    whole = cm.merge_checkpoint(base, adapter, tmp_path / "whole", progress=False)
    monkeypatch.setattr(cm, "MERGE_BLOCK_BYTES", 1024)
    blocks = cm.merge_checkpoint(base, adapter, tmp_path / "blocks", progress=False)
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "blocks")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)  # fp32 rounding at most; in practice equal
    assert blocks.peak_bytes < whole.peak_bytes


# ---- memory ---------------------------------------------------------------------------------


def test_peak_memory_is_one_tensor_plus_the_adapter_not_the_model(llama, tmp_path):
    root, base, adapter, _ = llama
    meter = cm.PeakMeter()
    tracemalloc.start()
    try:
        report = cm.merge_checkpoint(base, adapter, tmp_path / "out", progress=False, meter=meter)
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ckpt = cm.read_checkpoint(base)
    model_bytes = ckpt.nbytes
    largest_tensor = max(t.nbytes for t in ckpt.tensors.values())
    assert report.checkpoint_bytes == model_bytes
    assert report.adapter_bytes == sum(v.numel() * v.element_size()
                                       for v in load_file(adapter / "adapter_model.safetensors").values())
    # The meter counts the tensor bytes the merge holds: the adapter, the weight being merged
    # (its bytes + an fp32 block + its delta) or the copy buffer. Never the model, nor a shard.
    assert meter.live == 0 and report.peak_bytes == meter.peak
    assert report.peak_bytes <= report.adapter_bytes + 3 * largest_tensor
    assert report.peak_bytes < model_bytes
    assert report.peak_bytes < report.adapter_bytes + report.largest_shard_bytes
    # Python-side allocations (file reads, the adapter's bytes, headers) stay below the model too.
    assert traced_peak < model_bytes, (traced_peak, model_bytes)


# ---- refusals: before anything is written ----------------------------------------------------


def test_mismatching_adapter_refused_naming_the_tensor(llama, tmp_path, capsys):
    root, base, _, _ = llama
    torch.manual_seed(5)
    other = _save_base(LlamaForCausalLM(_llama_config(intermediate_size=96)), tmp_path / "other-base")
    adapter = _peft_adapter(other, LlamaForCausalLM, tmp_path / "adapter", r=4, lora_alpha=8,
                            target_modules=["q_proj", "down_proj"])
    out = tmp_path / "out"
    assert cli.main(["merge", "--quiet", str(base), str(adapter), str(out)]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj.weight" in err
    assert "[64, 128]" in err and "[64, 96]" in err  # the checkpoint's shape and the adapter's
    assert "nothing was written" in err
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_adapter_for_a_module_the_checkpoint_lacks_refused(llama, tmp_path, capsys):
    root, base, _, _ = llama
    torch.manual_seed(6)
    deeper = _save_base(LlamaForCausalLM(_llama_config(num_hidden_layers=3)), tmp_path / "deeper")
    adapter = _peft_adapter(deeper, LlamaForCausalLM, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["v_proj"])
    out = tmp_path / "out"
    assert cli.main(["merge", str(base), str(adapter), str(out)]) == 1
    err = capsys.readouterr().err
    assert "'model.layers.2.self_attn.v_proj.weight'" in err and "does not have" in err
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_rank_that_disagrees_with_the_config_refused(llama, tmp_path):
    root, base, adapter, _ = llama
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}  # down_proj was saved with r=2
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(cm.MergeError, match=r"rank 2 in the file.*r=4 in the config"):
        cm.merge_checkpoint(base, bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("feature", ["use_dora", "embedding", "conv"])
def test_features_lorakern_does_not_merge_are_refused(llama, tmp_path, feature):
    root, base, adapter, _ = llama
    bad = tmp_path / "adapter"
    bad.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    if feature == "use_dora":
        cfg["use_dora"] = True
        match = "use_dora"
    elif feature == "embedding":
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.zeros(64, 4)
        match = "embedding LoRA"
    else:
        A = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = A[:, :, None, None]
        match = "not matrices"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert cli.main(["merge", "--quiet", str(base), str(bad), str(out)]) == 1
    with pytest.raises(ValueError, match=match):
        cm.plan_merge(base, bad)
    assert not out.exists()


def test_merged_weight_that_overflows_its_dtype_is_refused(tmp_path):
    """fp16 holds at most 65504: a delta that pushes a weight past it is an error (found while
    writing, in the temporary folder: OUT_DIR never appears), not a silent inf."""
    torch.manual_seed(10)
    base = _save_base(LlamaForCausalLM(_llama_config()).to(torch.float16), tmp_path / "base")
    saved = _peft_adapter(base, LlamaForCausalLM, tmp_path / "saved", r=2, lora_alpha=2, target_modules=["o_proj"])
    tensors = {k: v * 1e3 for k, v in load_file(saved / "adapter_model.safetensors").items()}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((saved / "adapter_config.json").read_bytes())
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(cm.MergeError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight.*overflows F16"):
        cm.merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_existing_out_dir_needs_force_and_a_failure_leaves_nothing(llama, tmp_path):
    root, base, adapter, _ = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert cli.main(["merge", "--quiet", str(base), str(adapter), str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    # A failure while writing (here after the first shard): the old OUT_DIR stays as it was.
    calls = []

    def boom(name):
        calls.append(name)
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        cm.merge_checkpoint(base, adapter, out, force=True, progress=False, _after_shard=boom)
    assert len(calls) == 1 and sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with pytest.raises(OSError, match="simulated"):
        cm.merge_checkpoint(base, adapter, tmp_path / "new", progress=False, _after_shard=boom)
    assert not (tmp_path / "new").exists()
    _no_leftovers(tmp_path)
    # --force replaces it once the new one is complete; an empty OUT_DIR needs no --force.
    assert cli.main(["merge", "--quiet", "--force", str(base), str(adapter), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["merge", "--quiet", str(base), str(adapter), str(empty)]) == 0
    assert (empty / "config.json").is_file()
    _no_leftovers(tmp_path)
    # Never into the checkpoint or the adapter itself.
    assert cli.main(["merge", "--quiet", "--force", str(base), str(adapter), str(base)]) == 1
    assert cli.main(["merge", "--quiet", "--force", str(base), str(adapter), str(adapter)]) == 1


def test_plain_progress_without_tqdm(llama, tmp_path, capsys, monkeypatch):
    root, base, adapter, _ = llama
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: plain lines
    cm.merge_checkpoint(base, adapter, tmp_path / "out")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorakern merge: shard")]
    assert len(lines) == 4 and lines[-1].startswith("lorakern merge: shard 4/4 ")


def test_dry_run_writes_nothing(llama, tmp_path, capsys):
    root, base, adapter, _ = llama
    assert cli.main(["merge", "--dry-run", str(base), str(adapter), str(tmp_path / "out")]) == 0
    assert "the adapter fits: 8 tensor(s) to merge, 1 to replace whole" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_single_file_checkpoint_and_other_weight_files_not_copied(tmp_path):
    torch.manual_seed(7)
    model = LlamaForCausalLM(_llama_config())
    base = tmp_path / "base"
    model.save_pretrained(base)  # one model.safetensors
    torch.save({}, base / "pytorch_model.bin")  # an old copy of the weights: not copied
    (base / "original").mkdir()
    adapter = _peft_adapter(base, LlamaForCausalLM, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    report = cm.merge_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert report.shards == ["model.safetensors"] and report.copied == ["config.json", "generation_config.json"]
    assert report.skipped == ["original/", "pytorch_model.bin"]
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    ours = _tensors(tmp_path / "out")
    for key, value in ref.state_dict().items():
        assert torch.equal(ours[key], value), key


# ---- inspect ---------------------------------------------------------------------------------


def test_inspect_table_and_json(llama, capsys):
    root, base, adapter, _ = llama
    assert cli.main(["inspect", str(adapter)]) == 0
    table = capsys.readouterr().out
    assert cli.main(["inspect", "--json", str(adapter)]) == 0
    info = json.loads(capsys.readouterr().out)

    lora = load_file(adapter / "adapter_model.safetensors")
    modules = sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight"))
    assert len(modules) == 8
    rows = {r["module"]: r for r in info["modules"]}
    assert sorted(rows) == modules
    header = next(line for line in table.splitlines() if line.split()[:1] == ["module"])
    assert header.split() == ["module", "r", "alpha", "scaling", "out×in", "params", "‖s·BA‖_F"]
    norms = []
    for m in modules:
        A, B = lora[f"base_model.model.{m}.lora_A.weight"], lora[f"base_model.model.{m}.lora_B.weight"]
        r = 2 if "down_proj" in m else 6 if m == "model.layers.1.self_attn.q_proj" else 4
        alpha = 3 if "v_proj" in m else 8
        row = rows[m]
        assert (row["r"], row["alpha"], row["params"]) == (r, alpha, A.numel() + B.numel())
        assert row["scaling"] == pytest.approx(alpha / r)
        want = float(torch.linalg.norm(row["scaling"] * B.double() @ A.double()))
        assert row["delta_norm"] == pytest.approx(want, rel=1e-9)
        norms.append(want)
        # The table row: module, r, alpha, scaling, out×in, params, norm.
        line = next(line for line in table.splitlines() if line.split() and line.split()[0] == m)
        cells = line.split()
        assert cells[1] == str(r) and cells[5] == f"{A.numel() + B.numel():,}"
        assert float(cells[6]) == pytest.approx(want, rel=1e-5)
    totals = info["totals"]
    assert totals["lora_params"] == sum(r["params"] for r in rows.values())
    assert totals["delta_norm"] == pytest.approx(math.sqrt(sum(n * n for n in norms)))
    assert info["replaced_tensors"] == [{"tensor": "lm_head.weight", "kind": "modules_to_save", "shape": [128, 64],
                                         "params": 128 * 64}]
    assert totals["params"] == totals["lora_params"] + 128 * 64
    assert "total (8 modules)" in table and f"{totals['lora_params']:,}" in table
    assert "lm_head.weight" in table and f"parameters in the adapter: {totals['params']:,}" in table


def test_inspect_refuses_a_missing_dir(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
