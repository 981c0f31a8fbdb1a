"""Trainable tokens (LoraConfig(trainable_token_indices=...)), checked against PEFT.

PEFT 0.21 is the oracle: with the same values (PEFT's state dict copied in) the logits and
every gradient agree, state-dict and file keys are PEFT's, files move both ways with equal
logits, and merge / unload give PEFT's merge_and_unload tables. Models: tiny Llama with tied
and untied embeddings, and BERT (its MLM decoder tied to `word_embeddings`), built from
configs. Comparisons are fp32 at RTOL[float32].
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import lorakern
from lorakern.adapters import AdapterLoadError
from lorakern.trainable_tokens import TrainableTokensWrapper, token_layers
from tests.test_model_helpers import assert_same_state, full_state
from tests.utils import RTOL, assert_close

pytestmark = pytest.mark.usefixtures("quiet_warnings")

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

TOL = RTOL[torch.float32]
PREFIX = "base_model.model."
ST = "adapter_model.safetensors"
VOCAB = 48
DELTA = "token_adapter.trainable_tokens_delta"


def tiny_llama(tied: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1357)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=32, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(2468)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    return BertForMaskedLM(cfg).eval()


BUILD = {"llama-tied": lambda: tiny_llama(True), "llama-untied": lambda: tiny_llama(False), "bert": tiny_bert}
EMBED = {"llama-tied": "model.embed_tokens", "llama-untied": "model.embed_tokens", "bert": "bert.embeddings.word_embeddings"}
HEAD = {"llama-tied": "lm_head", "llama-untied": "lm_head", "bert": "cls.predictions.decoder"}
TARGETS = {"llama-tied": ["q_proj", "v_proj"], "llama-untied": ["q_proj", "v_proj"], "bert": ["query", "value"]}

# (model, trainable_token_indices): a list (the input embedding; a tied head follows it), a dict
# naming the tied head with the same ids (still tied), and with other ids (trained on their own).
CASES = [
    ("llama-tied", [3, 5, 7]),
    ("llama-tied", {"embed_tokens": [3, 5], "lm_head": [3, 5]}),
    ("llama-tied", {"embed_tokens": [3, 5], "lm_head": [4, 11]}),
    ("llama-untied", [3, 5, 7]),
    ("llama-untied", {"embed_tokens": [2, 9], "lm_head": [9, 30]}),
    ("bert", [1, 4, 8]),
]
IDS = [f"{m}-{'list' if isinstance(t, list) else '+'.join(f'{k}{v}' for k, v in t.items())}" for m, t in CASES]


def ids_batch(seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (2, 10), generator=g)
    x[0, :6] = torch.tensor([1, 3, 4, 5, 7, 9])  # every selected id of CASES shows up
    x[1, :4] = torch.tensor([2, 8, 11, 30])
    return x


def cfg(kind: str, tokens, **kw) -> dict:
    return dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], trainable_token_indices=tokens, **kw)


def peft_model(base: nn.Module, kind: str, tokens, **kw):
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg(kind, tokens, **kw)))


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every trainable parameter (LoRA weights, token rows) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def copy_from_peft(model: nn.Module, pm) -> None:
    sd = {k.removeprefix(PREFIX): v for k, v in pm.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected


def out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def table(model: nn.Module, kind: str) -> torch.Tensor:
    """The base input-embedding table, through lorakern's / PEFT's wrappers."""
    m = model.get_input_embeddings()
    while not isinstance(m, nn.Embedding):
        m = m.token_adapter.base_layer if hasattr(m, "token_adapter") else m.base_layer
    return m.weight


# ---- the layer and the config --------------------------------------------------------------


def test_forward_is_the_table_with_rows_replaced():
    emb = nn.Embedding(10, 4, padding_idx=0)
    w = TrainableTokensWrapper(emb)
    w.add_adapter("a", [2, 7])
    w.active_adapters = ["a"]
    with torch.no_grad():
        w.trainable_tokens_delta["a"].copy_(torch.arange(8.0).view(2, 4))
    x = torch.tensor([[0, 2, 3, 7, 2]])
    y = w(x)
    expect = emb.weight.detach().clone()
    expect[2], expect[7] = torch.arange(4.0), torch.arange(4.0, 8.0)
    assert torch.equal(y, expect[x])
    y.sum().backward()
    grad = w.trainable_tokens_delta["a"].grad
    assert torch.equal(grad, torch.tensor([[2.0] * 4, [1.0] * 4]))  # id 2 twice, id 7 once
    assert emb.weight.grad is None and not emb.weight.requires_grad


def test_config_field_validated_and_written():
    c = lorakern.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": (1, 2)})
    assert c.trainable_token_indices == {"embed_tokens": [1, 2]}
    d = c.to_peft_dict()
    assert d["trainable_token_indices"] == {"embed_tokens": [1, 2]}
    assert lorakern.LoraConfig.from_peft_dict(json.loads(json.dumps(d))).trainable_token_indices == {"embed_tokens": [1, 2]}
    for bad, err in (([], ValueError), ([1, 1], ValueError), ([-1], TypeError), ([True], TypeError), ("3", TypeError),
                     ({"embed_tokens": []}, ValueError), ({"": [1]}, TypeError), ({"e": [1.0]}, TypeError)):
        with pytest.raises(err, match="trainable_token_indices"):
            lorakern.LoraConfig(trainable_token_indices=bad)


class Tiny(nn.Module):
    """Not a transformers model: no get_input_embeddings, so a list goes to `embed_tokens` (PEFT's default)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed_tokens(x))


def test_plain_module_equals_peft():
    base = Tiny()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices=[4, 6]))
    perturb(pm)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices=[4, 6]))
    assert isinstance(model.embed_tokens, TrainableTokensWrapper)
    copy_from_peft(model, pm)
    x = torch.tensor([[4, 5, 6, 1]])
    with torch.no_grad():
        got, want = model(x), pm(x)
    assert_close(got, want, TOL, "out")
    assert not torch.allclose(got, base(x))


# ---- against PEFT -------------------------------------------------------------------------


@pytest.mark.parametrize("kind,tokens", CASES, ids=IDS)
def test_logits_gradients_and_keys_equal_peft(kind, tokens):
    base = BUILD[kind]()
    pm = peft_model(base, kind, tokens)
    perturb(pm)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg(kind, tokens)))
    assert set(model.state_dict()) == {k.removeprefix(PREFIX) for k in pm.state_dict()}
    copy_from_peft(model, pm)
    lk_train = {n for n, p in model.named_parameters() if p.requires_grad}
    pf_train = {n.removeprefix(PREFIX) for n, p in pm.named_parameters() if p.requires_grad}
    assert lk_train == pf_train
    assert lorakern.trainable_parameters(model) == tuple(pm.get_nb_trainable_parameters())
    x = ids_batch()
    assert_close(out(model, x), out(pm, x), TOL, "logits")
    assert not torch.allclose(out(model, x), out(base, x))
    for m in (model, pm):
        m(input_ids=x).logits.square().mean().backward()
    grads = {n.removeprefix(PREFIX): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads[n], TOL, n)
    rows = [p for n, p in model.named_parameters() if DELTA in n]
    assert rows and all(p.grad.abs().sum() > 0 for p in rows)


def test_bert_tied_head_keeps_its_bias():
    """The MLM decoder is tied to word_embeddings and has a bias: lorakern's tied head computes
    x W'ᵀ + b (PEFT's tied layer drops b; BERT initialises it to zero, so the test above agrees)."""
    base = tiny_bert()
    with torch.no_grad():
        base.cls.predictions.decoder.bias.normal_(0, 1.0)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg("bert", [40, 41])))
    with torch.no_grad():  # new rows; LoRA stays at its init (B = 0), a no-op
        rows = model.get_input_embeddings().trainable_tokens_delta["default"]
        rows.add_(torch.randn_like(rows))  # (a constant would vanish: the head's input is layer-normed)
    x = torch.tensor([[2, 3, 4, 5, 6, 7]])  # no selected id: the hidden states are the base model's
    got, want = out(model, x), out(base, x)
    keep = [i for i in range(VOCAB) if i not in (40, 41)]
    assert_close(got[..., keep], want[..., keep], TOL, "unselected logits")
    assert not torch.allclose(got[..., [40, 41]], want[..., [40, 41]])


@pytest.mark.parametrize("kind,tokens", CASES, ids=IDS)
def test_training_changes_only_the_selected_rows(kind, tokens):
    base = BUILD[kind]()
    before = table(base, kind).detach().clone()
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg(kind, tokens)))
    x = ids_batch()
    assert torch.equal(out(model, x), out(base, x))  # the rows start as copies: a no-op, as in PEFT
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    for _ in range(3):
        model(input_ids=x).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(table(model, kind), before)  # untouched until merge
    lorakern.unload(model)
    merged = model.get_input_embeddings().weight
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    changed = sorted((merged != before).any(1).nonzero().flatten().tolist())
    selected = set(tokens if isinstance(tokens, list) else tokens["embed_tokens"])
    if kind == "llama-tied" and isinstance(tokens, dict):
        selected |= set(tokens["lm_head"])  # the head's own ids land in the shared table too
    assert changed == sorted(selected)
    head = model.get_output_embeddings()
    assert (head.weight is merged) == (kind != "llama-untied")


@pytest.mark.parametrize("kind,tokens", CASES, ids=IDS)
def test_merge_unmerge_and_unload_equal_peft(kind, tokens):
    base = BUILD[kind]()
    pm = peft_model(base, kind, tokens)
    perturb(pm)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg(kind, tokens)))
    copy_from_peft(model, pm)
    x = ids_batch()
    unmerged, original = out(model, x), full_state(base)
    shared_own_ids = kind == "llama-tied" and isinstance(tokens, dict) and tokens["lm_head"] != tokens["embed_tokens"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakern.merge(model)
    assert any("share" in str(w.message) for w in caught) == shared_own_ids
    if not shared_own_ids:
        assert_close(out(model, x), unmerged, TOL, "merged logits")
    lorakern.unmerge(model)
    assert torch.equal(table(model, kind), original[[k for k in original if "embed" in k][0]])
    assert_close(out(model, x), unmerged, TOL, "unmerged logits")
    merged_peft = pm.merge_and_unload()
    plain = lorakern.unload(model)
    assert not list(token_layers(plain)) and not any(isinstance(m, lorakern.LoraLinear) for m in plain.modules())
    want = merged_peft.state_dict()
    got = plain.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert_close(got[k], want[k], TOL, k)
    assert_close(out(plain, x), out(merged_peft, x), TOL, "unloaded logits")


# ---- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,tokens", CASES, ids=IDS)
def test_lorakern_file_loads_in_peft(tmp_path, kind, tokens):
    base = BUILD[kind]()
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg(kind, tokens)))
    perturb(model)
    lorakern.save_adapter(model, tmp_path)
    keys = {k for k in load_file(tmp_path / ST) if DELTA in k}
    expect = {f"{PREFIX}{EMBED[kind]}.{DELTA}"}
    if isinstance(tokens, dict) and tokens["lm_head"] != tokens["embed_tokens"]:
        expect.add(f"{PREFIX}{HEAD[kind]}.{DELTA}")  # its own ids; a tied head's rows are the embedding's
    assert keys == expect
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == tokens
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = ids_batch()
    assert_close(out(pm, x), out(model, x), TOL, "PEFT logits of lorakern's file")


@pytest.mark.parametrize("kind,tokens", CASES, ids=IDS)
def test_peft_file_loads_in_lorakern(tmp_path, kind, tokens):
    base = BUILD[kind]()
    pm = peft_model(base, kind, tokens)
    perturb(pm)
    pm.save_pretrained(tmp_path)
    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    x = ids_batch()
    assert_close(out(model, x), out(pm, x), TOL, "lorakern logits of PEFT's file")
    assert all(p.requires_grad for n, p in model.named_parameters() if DELTA in n)
    frozen = lorakern.load_adapter(copy.deepcopy(base), tmp_path)  # PEFT's default: for inference
    assert not any(p.requires_grad for p in frozen.parameters())
    assert_close(out(frozen, x), out(pm, x), TOL, "frozen")


@pytest.mark.parametrize("tied", [True, False])
def test_save_embedding_layers_keys_equal_peft_and_load_back(tmp_path, tied):
    kind, tokens = ("llama-tied" if tied else "llama-untied"), [3, 5]
    base = BUILD[kind]()
    pm = peft_model(base, kind, tokens)
    perturb(pm)
    pm.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg(kind, tokens)))
    copy_from_peft(model, pm)
    lorakern.save_adapter(model, tmp_path / "lk", save_embedding_layers=True)
    peft_file, lk_file = load_file(tmp_path / "peft" / ST), load_file(tmp_path / "lk" / ST)
    assert set(lk_file) == set(peft_file)
    for k in peft_file:
        assert torch.equal(lk_file[k], peft_file[k]), k
    lorakern.save_adapter(model, tmp_path / "auto")  # "auto" does not save tables for trainable tokens (PEFT's rule)
    assert not any("base_layer.weight" in k and "embed" in k for k in load_file(tmp_path / "auto" / ST))
    back = lorakern.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    x = ids_batch()
    assert_close(out(back, x), out(pm, x), TOL, "logits")
    if tied:  # the head's copy of the shared rows must equal the embedding's
        bad = dict(peft_file)
        bad[f"{PREFIX}lm_head.{DELTA}"] = bad[f"{PREFIX}lm_head.{DELTA}"] + 1
        save_file(bad, tmp_path / "peft" / ST, metadata={"format": "pt"})
        fresh = copy.deepcopy(base)
        before = full_state(fresh)
        with pytest.raises(AdapterLoadError, match="tied"):
            lorakern.load_adapter(fresh, tmp_path / "peft")
        assert_same_state(fresh, before)


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied"])
def test_failed_load_leaves_the_model_as_it_was(tmp_path, kind):
    base = BUILD[kind]()
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg(kind, [3, 5])))
    perturb(model)
    lorakern.save_adapter(model, tmp_path / "ok")
    other = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg(kind, [9])), adapter_name="other")
    tensors = load_file(tmp_path / "ok" / ST)
    key = f"{PREFIX}model.embed_tokens.{DELTA}"
    for name, change in (("shape", lambda t: t[:1]), ("nan", lambda t: t * float("nan"))):
        bad = dict(tensors)
        bad[key] = change(bad[key]).contiguous()
        (tmp_path / name).mkdir()
        save_file(bad, tmp_path / name / ST, metadata={"format": "pt"})
        (tmp_path / name / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
        for target in (copy.deepcopy(base), other):
            before = full_state(target)
            kinds = {n: type(m) for n, m in target.named_modules()}
            grads = {n: p.requires_grad for n, p in target.named_parameters()}
            with pytest.raises(AdapterLoadError, match="trainable_tokens_delta|non-finite"):
                lorakern.load_adapter(target, tmp_path / name, adapter_name="new", is_trainable=True)
            assert_same_state(target, before)
            assert {n: type(m) for n, m in target.named_modules()} == kinds
            assert {n: p.requires_grad for n, p in target.named_parameters()} == grads
    # into an existing adapter with other ids: refused, nothing changes
    before = full_state(other)
    with pytest.raises(AdapterLoadError, match="token ids"):
        lorakern.load_adapter(other, tmp_path / "ok", adapter_name="other")
    assert_same_state(other, before)


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied"])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "beside-another"])
def test_failure_while_writing_rolls_back(tmp_path, monkeypatch, kind, existing):
    """A failure after validation (an OOM, ^C) while the values are written: everything undone,
    the wrappers the load put in (and its rows in wrappers that were there) included."""
    from lorakern import adapters as adapters_mod

    base = BUILD[kind]()
    saved = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg(kind, [3, 5])))
    perturb(saved)
    lorakern.save_adapter(saved, tmp_path)
    model = copy.deepcopy(base)
    if existing:
        lorakern.inject(model, lorakern.LoraConfig(**cfg(kind, [9])), adapter_name="other")
    before = full_state(model)
    kinds = {n: type(m) for n, m in model.named_modules()}
    held = {n: dict(w.token_indices) for n, w in token_layers(model)}
    real = adapters_mod._write_values

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("interrupted (simulated)")

    monkeypatch.setattr(adapters_mod, "_write_values", write_then_fail)
    with pytest.raises(KeyboardInterrupt, match="simulated"):
        lorakern.load_adapter(model, tmp_path, adapter_name="new", is_trainable=True)
    assert_same_state(model, before)
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    assert {n: dict(w.token_indices) for n, w in token_layers(model)} == held
    if kind == "llama-tied":
        assert _base_weight(model.lm_head) is _base_weight(model.model.embed_tokens)


def _base_weight(module: nn.Module) -> torch.Tensor:
    return module.base_layer.weight if isinstance(module, TrainableTokensWrapper) else module.weight


def test_auto_does_not_save_tables_for_trainable_tokens(tmp_path):
    """PEFT's rule: save_embedding_layers="auto" saves the tables of targeted embedding layers
    (lm_head here), except when the adapter trains tokens."""
    base = tiny_llama(False)
    kw = cfg("llama-untied", [3, 5])
    kw["target_modules"] = ["q_proj", "lm_head"]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    pm.save_pretrained(tmp_path / "peft")
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**kw))
    lorakern.save_adapter(model, tmp_path / "lk")
    keys = set(load_file(tmp_path / "lk" / ST))
    assert keys == set(load_file(tmp_path / "peft" / ST))
    assert not any(k.endswith("base_layer.weight") for k in keys)
    no_tokens = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    lorakern.save_adapter(no_tokens, tmp_path / "plain")  # without trainable tokens, "auto" saves the head's table
    assert f"{PREFIX}lm_head.base_layer.weight" in load_file(tmp_path / "plain" / ST)


# ---- several adapters ----------------------------------------------------------------------


def test_two_adapters_switch_delete_and_refuse_both_active():
    base = tiny_llama(True)
    pm = peft_model(base, "llama-tied", [3, 5])
    pm.add_adapter("b", peft.LoraConfig(**cfg("llama-tied", [5, 7, 9])))
    pm.set_adapter("b")
    perturb(pm)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg("llama-tied", [3, 5])))
    lorakern.inject(model, lorakern.LoraConfig(**cfg("llama-tied", [5, 7, 9])), adapter_name="b")
    lorakern.set_adapter(model, "b")
    copy_from_peft(model, pm)
    x = ids_batch()
    assert_close(out(model, x), out(pm, x), TOL, "adapter b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert f"model.embed_tokens.{DELTA}.b" in trainable and f"model.embed_tokens.{DELTA}.default" not in trainable
    pm.set_adapter("default")
    lorakern.set_adapter(model, "default")
    assert_close(out(model, x), out(pm, x), TOL, "adapter default")
    with pytest.raises(ValueError, match="trainable tokens on"):
        lorakern.set_adapter(model, ["default", "b"])
    assert lorakern.model.active_adapters(model) == ["default"]
    # merging both (one module, overlapping id 5) is refused before anything changes
    before = full_state(model)
    with pytest.raises(ValueError, match="overlap"):
        lorakern.merge(model, ["default", "b"])
    assert_same_state(model, before)
    # merged, then switching: unmerged first, the table is the base's again
    lorakern.merge(model)
    with pytest.warns(UserWarning):
        lorakern.set_adapter(model, "b")
    assert torch.equal(table(model, "llama-tied"), table(base, "llama-tied"))
    pm.set_adapter("b")
    assert_close(out(model, x), out(pm, x), TOL, "b after the switch")
    lorakern.delete_adapter(model, "b")
    pm.delete_adapter("b")
    assert_close(out(model, x), out(pm, x), TOL, "after deleting b")
    lorakern.delete_adapter(model, "default")
    assert isinstance(model.model.embed_tokens, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_close(out(model, x), out(base, x), TOL, "all deleted")


def test_disable_adapters_gives_the_base_model_also_when_merged():
    base = tiny_llama(True)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg("llama-tied", [3, 5])))
    perturb(model)
    x = ids_batch()
    with lorakern.disable_adapters(model):
        assert_close(out(model, x), out(base, x), TOL, "disabled")
    lorakern.merge(model)
    with lorakern.disable_adapters(model):
        assert_close(out(model, x), out(base, x), TOL, "disabled after merge")


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,extra,err,match",
    [
        ("llama-untied", dict(target_modules=["q_proj", "embed_tokens"]), ValueError, "LoRA"),  # PEFT: TypeError
        ("llama-untied", dict(modules_to_save=["embed_tokens"]), ValueError, "modules_to_save"),  # PEFT: ValueError
        ("llama-tied", dict(target_modules=["q_proj", "lm_head"]), ValueError, "shares its weight"),
        ("llama-tied", dict(modules_to_save=["lm_head"]), ValueError, "shares its weight"),  # PEFT fails in forward
        ("llama-untied", dict(trainable_token_indices={"no_such_module": [1]}), ValueError, "matches no module"),
        ("llama-untied", dict(trainable_token_indices=[3, VOCAB]), ValueError, "out of range"),
        ("llama-untied", dict(trainable_token_indices={"q_proj": [1]}), ValueError, "LoRA"),
        ("llama-untied", dict(trainable_token_indices={"input_layernorm": [1]}), TypeError, "nn.Embedding"),
    ],
    ids=["lora-on-embedding", "embedding-in-modules_to_save", "tied-head-lora", "tied-head-saved", "no-match",
         "out-of-range", "lora-target", "not-an-embedding"],
)
def test_refused_before_the_model_changes(kind, extra, err, match):
    model = BUILD[kind]()
    before = full_state(model)
    kinds = {n: type(m) for n, m in model.named_modules()}
    args = {**cfg(kind, [3, 5]), **extra}
    with pytest.raises(err, match=match):
        lorakern.inject(model, lorakern.LoraConfig(**args))
    assert_same_state(model, before)
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    assert not hasattr(model, "_lorakern")


def test_other_operations_refused():
    model = lorakern.inject(tiny_llama(False), lorakern.LoraConfig(**cfg("llama-untied", [3])))
    lorakern.inject(model, lorakern.LoraConfig(**cfg("llama-untied", [4])), adapter_name="b")
    with pytest.raises(ValueError, match="trainable_token_indices"):
        lorakern.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "sum", combination_type="cat")
    with pytest.raises(TypeError, match="TrainableTokensWrapper"):  # LoRA on the wrapped embedding
        lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["embed_tokens"]), adapter_name="c")
    with pytest.raises(ValueError, match="trainable tokens"):  # ... or a copy of it
        lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                        adapter_name="d")


def test_hotswap_of_trainable_tokens_refused(tmp_path):
    base = tiny_llama(False)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg("llama-untied", [3, 5])))
    perturb(model)
    lorakern.save_adapter(model, tmp_path)
    before = full_state(model)
    with pytest.raises(AdapterLoadError, match="hot-swapping"):
        lorakern.hotswap_adapter(model, tmp_path, "default")
    assert_same_state(model, before)


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied"])
def test_mixed_batch_rows_take_their_adapters_tokens_as_peft(kind):
    """Each row through its adapter's rows (and LoRA), "__base__" rows through the table alone:
    PEFT's mixed-batch logits (peft_model(..., adapter_names=...)); merged tokens are refused."""
    base = BUILD[kind]()
    pm = peft_model(base, kind, [3, 5])
    pm.add_adapter("b", peft.LoraConfig(**cfg(kind, [5, 7, 9])))
    perturb(pm)
    pm.eval()
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**cfg(kind, [3, 5])))
    lorakern.inject(model, lorakern.LoraConfig(**cfg(kind, [5, 7, 9])), adapter_name="b")
    copy_from_peft(model, pm)
    model.eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (4, 10), generator=g)
    x[:, :4] = torch.tensor([3, 5, 7, 9])  # every selected id in every row
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        want = pm(input_ids=x, adapter_names=names).logits
        with lorakern.mixed_batch(model, names):
            got = model(input_ids=x).logits
    assert_close(got, want, TOL, "mixed batch")
    assert not torch.allclose(got[0], got[2]) and not torch.allclose(got[1], got[2])
    lorakern.merge(model)
    with pytest.raises(ValueError, match="merged"):
        with lorakern.mixed_batch(model, names):
            pass
