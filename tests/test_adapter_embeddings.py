"""Adapter files that carry embedding / output-head weights (issue 13, item 1).

PEFT's save_embedding_layers writes the base model's input / output embedding weights
into the adapter (`model.embed_tokens.weight`, `lm_head.weight`,
`lm_head.base_layer.weight` when lm_head is a LoRA target, `<layer>.original_module.weight`
for a modules_to_save layer, BERT's `word_embeddings` / `decoder`): when the vocabulary
was resized, or when an embedding layer is targeted. lorakern loads them as PEFT does
(into the base model, checked and rolled back like every other key) and writes them under
the same keys and conditions. Tiny models built from configs; nothing reaches the Hub.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakern
from lorakern.adapters import AdapterLoadError, adapter_state_dict
from tests.test_model_helpers import assert_same_state, full_state, tiny_mlp
from tests.utils import RTOL, assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("quiet_warnings")

TOL = RTOL[torch.float32]
CLOSE = 1e-6  # PEFT file -> lorakern: the same fp32 math (the CPU op gives the same bits today)
PREFIX = "base_model.model."
ST = "adapter_model.safetensors"
VOCAB, NEW_VOCAB = 128, 136
RESIZED_WARNING = "as the embedding layer has been resized"
TARGETED_WARNING = "as embedding layers found in `target_modules`"


def tiny_llama(tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(2024)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(2025)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForMaskedLM(cfg).eval()


def resized(model: torch.nn.Module) -> torch.nn.Module:
    """`model` after add_tokens + resize_token_embeddings: NEW_VOCAB rows."""
    model.resize_token_embeddings(NEW_VOCAB, mean_resizing=False)
    return model


def ids(vocab: int = NEW_VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def fine_tuned_peft(base, **kwargs):
    """A PEFT model of a copy of `base` with non-zero LoRA weights and changed input / output
    embeddings (as training the new tokens' rows would change them), so that every tensor
    PEFT may save differs from `base`."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs))
    inner = pm.get_base_model()
    params = {id(p): p for p in pm.parameters() if p.requires_grad}
    for layer in (inner.get_input_embeddings(), inner.get_output_embeddings()):
        params.update({id(p): p for p in layer.parameters()})  # tied: once
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def saved_keys(path) -> set[str]:
    return set(load_file(path / ST))


def embedding_keys(path) -> set[str]:
    return {k for k in saved_keys(path) if not re.search(r"\.lora_[AB]\.weight$", k)}


def save_peft(pm, path, choice) -> list[str]:
    """pm.save_pretrained(path, save_embedding_layers=choice); the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.save_pretrained(path, save_embedding_layers=choice)
    return [str(w.message) for w in caught if "embedding" in str(w.message)]


def save_lorakern(model, path, choice) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakern.save_adapter(model, path, save_embedding_layers=choice)
    return [str(w.message) for w in caught if "embedding" in str(w.message)]


def assert_load_fails_unchanged(model, path, match: str) -> AdapterLoadError:
    before = full_state(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(AdapterLoadError, match=match) as info:
        lorakern.load_adapter(model, path)
    assert_same_state(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not hasattr(model, "_lorakern")
    return info.value


# ------------------------------------------------------------- (a) PEFT -> lorakern


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_peft_resized_vocab_adapter_loads_in_lorakern(tmp_path, tie):
    base = resized(tiny_llama(tie))
    pm = fine_tuned_peft(base, target_modules=["q_proj", "v_proj"])
    save_peft(pm, tmp_path, True)
    assert embedding_keys(tmp_path) == {PREFIX + "model.embed_tokens.weight", PREFIX + "lm_head.weight"}
    x = ids()
    ref = logits(pm, x)
    assert not torch.allclose(ref, logits(base, x))

    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path)
    assert_close(logits(model, x), ref, CLOSE, "logits")
    assert_close(logits(model, x), logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x), CLOSE, "PEFT-loaded")
    theirs = pm.get_base_model()
    assert torch.equal(model.model.embed_tokens.weight, theirs.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, theirs.lm_head.weight)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie  # tying kept as it was
    assert not model.model.embed_tokens.weight.requires_grad  # the base stays frozen


def test_peft_bert_resized_vocab_adapter_loads_in_lorakern(tmp_path):
    """BERT's embeddings are `bert.embeddings.word_embeddings` and `cls.predictions.decoder`
    (tied, with a bias): whatever get_input/output_embeddings name, not a fixed list."""
    base = resized(tiny_bert())
    pm = fine_tuned_peft(base, target_modules=["query", "value"])
    save_peft(pm, tmp_path, True)
    assert embedding_keys(tmp_path) == {
        PREFIX + "bert.embeddings.word_embeddings.weight",
        PREFIX + "cls.predictions.decoder.weight",
        PREFIX + "cls.predictions.decoder.bias",
    }
    x = ids()
    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path)
    assert_close(logits(model, x), logits(pm, x), CLOSE, "logits")
    assert torch.equal(model.cls.predictions.decoder.bias, pm.get_base_model().cls.predictions.decoder.bias)


def test_peft_gpt2_resized_vocab_adapter_loads_in_lorakern(tmp_path):
    """GPT-2: `transformer.wte` and a tied `lm_head`, Conv1D targets."""
    from tests.test_model_helpers import tiny_gpt2

    base = resized(tiny_gpt2())
    pm = fine_tuned_peft(base, target_modules=["c_attn"], fan_in_fan_out=True)
    save_peft(pm, tmp_path, True)
    assert embedding_keys(tmp_path) == {PREFIX + "transformer.wte.weight", PREFIX + "lm_head.weight"}
    x = ids()
    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path)
    assert_close(logits(model, x), logits(pm, x), CLOSE, "logits")
    assert model.lm_head.weight is model.transformer.wte.weight


def test_embeddings_load_into_an_existing_adapter(tmp_path):
    """Loading into a model that has the adapter already replaces the embeddings too."""
    base = resized(tiny_llama())
    pm = fine_tuned_peft(base, target_modules=["q_proj"])
    save_peft(pm, tmp_path, True)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    lorakern.load_adapter(model, tmp_path)
    x = ids()
    assert_close(logits(model, x), logits(pm, x), CLOSE, "logits")


# ------------------------------------------------------------- (b) lorakern saves as PEFT does


def twins(base, tmp_path, **kwargs):
    """A fine-tuned PEFT model of `base` and a lorakern model in the same state: both load
    one PEFT file saved with save_embedding_layers=True. (Where an embedding layer is
    targeted, PEFT saves only the targeted ones, so the PEFT model is reloaded too.)"""
    save_peft(fine_tuned_peft(base, **kwargs), tmp_path / "twin", True)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "twin")
    return pm, lorakern.load_adapter(copy.deepcopy(base), tmp_path / "twin")


EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
MTS = {EMB, HEAD, "model.embed_tokens.original_module.weight", "model.embed_tokens.modules_to_save.weight",
       "lm_head.original_module.weight", "lm_head.modules_to_save.weight"}
SAVE_CASES = {
    # config, save_embedding_layers, the non-LoRA keys saved (a model built from a config:
    # "auto" has no base config to compare the vocabulary with, so only targeting counts)
    "plain-auto": (dict(target_modules=["q_proj", "v_proj"]), "auto", set()),
    "plain-true": (dict(target_modules=["q_proj", "v_proj"]), True, {EMB, HEAD}),
    "plain-false": (dict(target_modules=["q_proj", "v_proj"]), False, set()),
    "lm_head-target-auto": (dict(target_modules=["q_proj", "lm_head"]), "auto", {"lm_head.base_layer.weight"}),
    "lm_head-target-false": (dict(target_modules=["q_proj", "lm_head"]), False, set()),
    "lm_head-regex-auto": (dict(target_modules=r".*\.q_proj|lm_head"), "auto", {"lm_head.base_layer.weight"}),
    "mts-true": (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), True, MTS),
    "mts-auto": (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), "auto", {EMB, HEAD}),
    "all-linear-auto": (dict(target_modules="all-linear"), "auto", set()),
    # targeted: an embedding layer that is not a LoRA layer (here a saved module) is not saved
    "lm_head-target-mts-auto": (
        dict(target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"]), "auto",
        {"lm_head.base_layer.weight", EMB},
    ),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_lorakern_saves_embeddings_when_peft_does(tmp_path, case):
    """Same keys and same "Setting save_embedding_layers to True" warning as PEFT for the
    same model and choice; PeftModel.from_pretrained loads lorakern's file to lorakern's logits."""
    kwargs, choice, expect = SAVE_CASES[case]
    base = resized(tiny_llama())
    pm, model = twins(base, tmp_path, **kwargs)
    x = ids()
    assert_close(logits(model, x), logits(pm, x), TOL, "twin")

    theirs = save_peft(pm, tmp_path / "peft", choice)
    ours = save_lorakern(model, tmp_path / "lk", choice)
    assert embedding_keys(tmp_path / "lk") == {PREFIX + k for k in expect}
    assert saved_keys(tmp_path / "lk") == saved_keys(tmp_path / "peft")
    assert ours == theirs
    assert bool(ours) == (choice == "auto" and case.startswith("lm_head-"))  # targeted; no resize detectable

    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk")
    reloaded = lorakern.load_adapter(copy.deepcopy(base), tmp_path / "lk")
    assert_close(logits(back, x), logits(reloaded, x), TOL, "PEFT and lorakern load lorakern's file alike")
    if expect - {EMB, HEAD} or (EMB in expect and "mts" not in case):
        assert_close(logits(back, x), logits(model, x), TOL, "with its embeddings")


def test_lm_head_target_saves_its_base_weight(tmp_path):
    """lm_head as a LoRA target: "auto" warns and saves `lm_head.base_layer.weight` only
    (PEFT's rule: a targeted embedding saves the targeted layers' base weights)."""
    base = resized(tiny_llama())
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        model.lm_head.base_layer.weight.add_(1.0)
    with pytest.warns(UserWarning, match=re.escape(TARGETED_WARNING)):
        lorakern.save_adapter(model, tmp_path)
    assert embedding_keys(tmp_path) == {PREFIX + "lm_head.base_layer.weight"}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(pm.get_base_model().lm_head.base_layer.weight, model.lm_head.base_layer.weight)
    assert_close(logits(pm, ids()), logits(model, ids()), TOL, "logits")


@pytest.fixture
def local_base(tmp_path):
    """A tiny Llama saved to a directory and loaded from it (name_or_path = that directory),
    as from_pretrained gives it, then resized."""
    tiny_llama().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    return base


def test_auto_saves_after_a_resize_of_a_local_base(tmp_path, local_base):
    """"auto" compares config.vocab_size with the base's config.json: resized, it saves the
    embeddings with PEFT's warning, as PEFT does; not resized, it saves none."""
    plain = copy.deepcopy(local_base)
    for base, expect in ((plain, set()), (resized(local_base), {"model.embed_tokens.weight", "lm_head.weight"})):
        out = tmp_path / f"out{len(expect)}"
        pm, model = twins(base, out, target_modules=["q_proj"])
        theirs = save_peft(pm, out / "peft", "auto")
        ours = save_lorakern(model, out / "lk", "auto")
        assert embedding_keys(out / "lk") == {PREFIX + k for k in expect}
        assert saved_keys(out / "lk") == saved_keys(out / "peft")
        assert ours == theirs
        assert bool(expect) == any(RESIZED_WARNING in w for w in ours)
        x = ids(base.config.vocab_size)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "lk")
        assert_close(logits(back, x), logits(lorakern.load_adapter(copy.deepcopy(base), out / "lk"), x), TOL, "reloaded")
        if expect:
            assert_close(logits(back, x), logits(model, x), TOL, "PEFT loads the embeddings lorakern saved")


def test_auto_reads_the_base_config_from_the_hf_cache_only(tmp_path, monkeypatch):
    """A model loaded by Hub id: lorakern reads that repo's config.json from the local
    Hugging Face cache (at the commit the model came from), never from the network; with
    none cached it warns and does not save the embeddings (pass True)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(tiny_llama().config.to_json_string())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    model = lorakern.inject(resized(tiny_llama()), lorakern.LoraConfig(r=4, target_modules=["q_proj"]))
    model.name_or_path = model.config._name_or_path = "someone/tiny-llama"
    model.config._commit_hash = commit
    with pytest.warns(UserWarning, match=RESIZED_WARNING):
        lorakern.save_adapter(model, tmp_path / "cached")
    assert embedding_keys(tmp_path / "cached") == {PREFIX + "model.embed_tokens.weight", PREFIX + "lm_head.weight"}

    model.name_or_path = model.config._name_or_path = "someone/not-cached"
    with pytest.warns(UserWarning, match="found no config.json of the base model 'someone/not-cached'"):
        lorakern.save_adapter(model, tmp_path / "uncached")
    assert not embedding_keys(tmp_path / "uncached")


def test_save_embedding_layers_argument(tmp_path):
    model = lorakern.inject(tiny_llama(), lorakern.LoraConfig(r=2, target_modules=["q_proj"]))
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="save_embedding_layers must be True, False or 'auto'"):
            lorakern.save_adapter(model, tmp_path, save_embedding_layers=bad)
    assert not (tmp_path / ST).exists()
    assert set(adapter_state_dict(model, save_embedding_layers=True)) >= {PREFIX + "lm_head.weight"}
    # Not a transformers model: PEFT's warning, nothing extra saved.
    mlp = lorakern.inject(tiny_mlp(), lorakern.LoraConfig(r=2, target_modules=["up"]))
    with pytest.warns(UserWarning, match="not a 🤗 transformers model"):
        lorakern.save_adapter(mlp, tmp_path / "mlp", save_embedding_layers=True)
    assert not embedding_keys(tmp_path / "mlp")


# ------------------------------------------------------------- (c) refused, model unchanged


def test_vocab_size_mismatch_is_refused_naming_key_and_shapes(tmp_path):
    pm = fine_tuned_peft(resized(tiny_llama()), target_modules=["q_proj", "v_proj"])
    save_peft(pm, tmp_path, True)
    exc = assert_load_fails_unchanged(tiny_llama(), tmp_path, "resize_token_embeddings")
    msg = str(exc)
    assert isinstance(exc, ValueError)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert re.search(re.escape(PREFIX + key) + r": shape \[136, 64\] in the file, but \[128, 64\]", msg), msg


def test_embedding_mismatch_refused_into_existing_adapter(tmp_path):
    pm = fine_tuned_peft(resized(tiny_llama()), target_modules=["q_proj"])
    save_peft(pm, tmp_path, True)
    model = lorakern.inject(tiny_llama(), lorakern.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    before = full_state(model)
    with pytest.raises(AdapterLoadError, match=r"\[136, 64\].*\[128, 64\]"):
        lorakern.load_adapter(model, tmp_path)
    assert_same_state(model, before)


def test_non_finite_embedding_is_refused(tmp_path):
    base = resized(tiny_llama())
    save_peft(fine_tuned_peft(base, target_modules=["q_proj"]), tmp_path, True)
    tensors = load_file(tmp_path / ST)
    tensors[PREFIX + "lm_head.weight"][3, 4] = float("nan")
    save_file(tensors, tmp_path / ST, metadata={"format": "pt"})
    assert_load_fails_unchanged(copy.deepcopy(base), tmp_path, r"lm_head\.weight: has non-finite values")


def test_failure_after_embeddings_were_written_rolls_them_back(tmp_path, monkeypatch):
    """An error on the load's last copy (after the embedding weights were written) puts
    the model back exactly: embeddings, injected layers, flags."""
    base = resized(tiny_llama())
    save_peft(fine_tuned_peft(base, target_modules=["q_proj", "v_proj"]), tmp_path, True)
    n_keys = len(saved_keys(tmp_path))
    calls = []
    real_copy = torch.Tensor.copy_

    def copy_(self, src, *args, **kwargs):
        calls.append(tuple(self.shape))
        if len(calls) == n_keys:  # the last copy of the load; the undo's copies pass
            raise KeyboardInterrupt
        return real_copy(self, src, *args, **kwargs)

    model = copy.deepcopy(base)
    before = full_state(model)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    with pytest.raises(KeyboardInterrupt):
        lorakern.load_adapter(model, tmp_path)
    monkeypatch.undo()
    assert (NEW_VOCAB, 64) in calls[: n_keys - 1]  # an embedding had been written
    assert_same_state(model, before)
    assert not hasattr(model, "_lorakern")


def test_embedding_keys_of_another_model_are_unexpected(tmp_path):
    """Only the model's own embedding layers take embedding weights: a key for a module
    that is not one (or a model without get_input_embeddings) is refused as before."""
    base = resized(tiny_llama())
    save_peft(fine_tuned_peft(base, target_modules=["q_proj"]), tmp_path, True)
    tensors = load_file(tmp_path / ST)
    tensors[PREFIX + "model.norm.weight"] = torch.ones(64)
    save_file(tensors, tmp_path / ST, metadata={"format": "pt"})
    assert_load_fails_unchanged(copy.deepcopy(base), tmp_path, r"unexpected keys \['base_model\.model\.model\.norm\.weight'\]")


# ------------------------------------------------------------- (d) tied embeddings


def test_tied_lm_head_target_updates_both(tmp_path):
    """Tied input / output embeddings are one parameter: PEFT saves only
    `lm_head.base_layer.weight` for a targeted lm_head, and loading it (PEFT or lorakern)
    changes the input embeddings too."""
    base = resized(tiny_llama(tie=True))
    pm = fine_tuned_peft(base, target_modules=["q_proj", "lm_head"])
    assert save_peft(pm, tmp_path, "auto") == [f"Setting `save_embedding_layers` to `True` {TARGETED_WARNING}."]
    assert embedding_keys(tmp_path) == {PREFIX + "lm_head.base_layer.weight"}
    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, pm.get_base_model().model.embed_tokens.weight)
    x = ids()
    assert_close(logits(model, x), logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), x), TOL, "logits")


def test_tied_keys_with_different_values_are_refused(tmp_path):
    """A file whose two keys for one tied parameter differ (PEFT keeps whichever it copies
    last) is refused, the model unchanged."""
    base = resized(tiny_llama(tie=True))
    save_peft(fine_tuned_peft(base, target_modules=["q_proj"]), tmp_path, True)
    tensors = load_file(tmp_path / ST)
    assert torch.equal(tensors[PREFIX + "lm_head.weight"], tensors[PREFIX + "model.embed_tokens.weight"])
    lorakern.load_adapter(copy.deepcopy(base), tmp_path)  # equal values: fine
    tensors[PREFIX + "lm_head.weight"] = tensors[PREFIX + "lm_head.weight"] + 1
    save_file(tensors, tmp_path / ST, metadata={"format": "pt"})
    assert_load_fails_unchanged(copy.deepcopy(base), tmp_path, "tied weights")
    # Untied, the same file loads: two parameters.
    untied = resized(tiny_llama(tie=False))
    model = lorakern.load_adapter(untied, tmp_path)
    assert torch.equal(model.lm_head.weight, tensors[PREFIX + "lm_head.weight"])


# ------------------------------------------------------------- modules_to_save embeddings


def test_modules_to_save_embeddings_both_ways(tmp_path):
    """modules_to_save=["embed_tokens", "lm_head"] after a resize (the usual recipe): PEFT
    also writes `<layer>.original_module.weight` (loaded into the base) and
    `<layer>.modules_to_save.weight` (its own load ignores it); both directions give equal logits."""
    base = resized(tiny_llama())
    pm = fine_tuned_peft(base, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    save_peft(pm, tmp_path / "peft", True)
    assert {PREFIX + "lm_head.original_module.weight", PREFIX + "lm_head.modules_to_save.weight"} <= embedding_keys(tmp_path / "peft")
    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    x = ids()
    assert_close(logits(model, x), logits(pm, x), TOL, "logits")
    theirs = pm.get_base_model()
    assert torch.equal(model.lm_head.original_module.weight, theirs.lm_head.original_module.weight)
    save_lorakern(model, tmp_path / "lk", True)
    assert saved_keys(tmp_path / "lk") == saved_keys(tmp_path / "peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk")
    assert_close(logits(back, x), logits(model, x), TOL, "PEFT loads lorakern's file")


def test_saved_config_is_unchanged_by_embeddings(tmp_path):
    """Embedding weights change nothing in adapter_config.json."""
    model = lorakern.inject(tiny_llama(), lorakern.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakern.save_adapter(model, tmp_path / "a", save_embedding_layers=False)
    lorakern.save_adapter(model, tmp_path / "b", save_embedding_layers=True)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "b" / "adapter_config.json").read_text()
    )
