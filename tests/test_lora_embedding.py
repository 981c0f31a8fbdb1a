"""LoRA on nn.Embedding (lorakern.LoraEmbedding), checked against PEFT's lora.Embedding.

PEFT 0.21 is the oracle: the same adapter weights give the same outputs and gradients,
merges give the same tables, and adapter files move between the two libraries with
equal logits. Models are tiny transformers built from configs (Llama: untied
`embed_tokens`; GPT-2: `wte` tied to the head; BERT: `word_embeddings` with a
padding_idx) plus small hand-built modules for the layer's own options. Comparisons are
fp32 at RTOL[float32].
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakern
from lorakern import adapters as adapters_mod
from lorakern.adapters import AdapterLoadError
from lorakern.embedding import LoraEmbedding
from lorakern.model import adapter_state, lora_layers
from tests.test_model_helpers import VOCAB, assert_same_state, full_state, input_ids, logits, train_steps
from tests.utils import RTOL, assert_close

pytestmark = pytest.mark.usefixtures("quiet_warnings")

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

TOL = RTOL[torch.float32]
PREFIX = "base_model.model."
ST = "adapter_model.safetensors"


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(2468)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    return BertForMaskedLM(cfg).eval()


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


@pytest.fixture(scope="module")
def ids():
    x = input_ids()
    x[0, :2] = 0  # BERT's padding_idx: no gradient reaches that row of A
    return x


# Each case: (model fixture, config kwargs shared by both libraries; init_lora_weights=False
# gives a non-zero delta from the start).
CASES = {
    "llama-embed": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])),
    "llama-embed-linear": ("llama", dict(r=4, lora_alpha=6, target_modules=["embed_tokens", "q_proj", "down_proj"])),
    "llama-embed-patterns-rslora": (
        "llama",
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=r".*(embed_tokens|v_proj)",
             rank_pattern={"embed_tokens": 6}, alpha_pattern={"embed_tokens": 3}),
    ),
    "gpt2-wte-conv1d": ("gpt2", dict(r=3, lora_alpha=5, target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    "bert-word-embeddings": ("bert", dict(r=2, lora_alpha=4, target_modules=["word_embeddings", "query"])),
}


def _config(kwargs, lib, **extra):
    return (peft.LoraConfig if lib == "peft" else lorakern.LoraConfig)(**{"init_lora_weights": False, **kwargs, **extra})


def _pair(base, kwargs, **extra):
    """(PEFT model, lorakern model) with the same adapter weights (PEFT's random init)."""
    pm = peft.get_peft_model(copy.deepcopy(base), _config(kwargs, "peft", **extra))
    model = lorakern.inject(copy.deepcopy(base), _config(kwargs, "lorakern", **extra))
    missing, unexpected = model.load_state_dict({n.removeprefix(PREFIX): p for n, p in pm.state_dict().items()})
    assert not missing and not unexpected, (missing, unexpected)
    return pm, model


def _grads(model, prefix=""):
    return {n.removeprefix(prefix): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _embedding_names(model):
    return sorted(n for n, layer in lora_layers(model) if isinstance(layer, LoraEmbedding))


# ------------------------------------------------------------------- forward, backward


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_peft(case, request, ids):
    fixture, kwargs = CASES[case]
    base = request.getfixturevalue(fixture)
    pm, model = _pair(base, kwargs)
    assert _embedding_names(model), "no LoraEmbedding injected"
    peft_emb = {n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Embedding)}
    assert set(_embedding_names(model)) == peft_emb
    assert {n for n, _ in lora_layers(model)} == {
        n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    for name, layer in lora_layers(model):  # ranks and scalings from the patterns, as PEFT
        theirs = pm.base_model.model.get_submodule(name)
        assert layer.r["default"] == theirs.r["default"], name
        assert layer.scaling["default"] == pytest.approx(theirs.scaling["default"], rel=1e-12), name

    # Same trainable parameters, by name and count.
    theirs = {n.removeprefix(PREFIX) for n, p in pm.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == theirs
    assert lorakern.trainable_parameters(model) == pm.get_nb_trainable_parameters()

    pm.train()
    model.train()
    out_theirs = pm(input_ids=ids, labels=ids)
    out_ours = model(input_ids=ids, labels=ids)
    assert not torch.allclose(out_ours.logits, base(input_ids=ids).logits), "the adapter changes nothing"
    assert_close(out_ours.logits, out_theirs.logits, TOL, "logits")
    out_theirs.loss.backward()
    out_ours.loss.backward()
    g_theirs, g_ours = _grads(pm, PREFIX), _grads(model)
    assert g_ours.keys() == g_theirs.keys()
    for n in g_ours:
        assert_close(g_ours[n], g_theirs[n], TOL, f"grad {n}")
    emb_grads = [n for n in g_ours if "lora_embedding_" in n]
    assert emb_grads and all(g_ours[n].abs().sum() > 0 for n in emb_grads)


def test_padding_idx_column_of_A_gets_no_gradient(bert, ids):
    _, model = _pair(bert, CASES["bert-word-embeddings"][1])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    A = model.bert.embeddings.word_embeddings.lora_embedding_A["default"]
    assert A.grad[:, 0].abs().sum() == 0  # padding_idx 0, present in ids
    assert A.grad[:, ids[1, 0]].abs().sum() > 0


def test_dropout_is_not_applied_to_embeddings_as_in_peft(llama, ids):
    """PEFT builds an nn.Dropout for an embedding adapter but never calls it: train-mode
    outputs are deterministic and equal to eval-mode ones."""
    pm, model = _pair(llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], lora_dropout=0.5))
    pm.train()
    model.train()
    first = model(input_ids=ids).logits
    assert torch.equal(first, model(input_ids=ids).logits)
    assert_close(first, pm(input_ids=ids).logits, TOL, "train-mode logits")
    model.eval()
    assert torch.equal(first, model(input_ids=ids).logits)


def test_default_init_is_peft_s_and_starts_at_the_base(llama, ids):
    """init_lora_weights=True: A zero, B standard normal; from one seed, PEFT's values."""
    cfg = dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    torch.manual_seed(11)
    pm = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(**cfg))
    torch.manual_seed(11)
    model = lorakern.inject(copy.deepcopy(llama), lorakern.LoraConfig(**cfg))
    ours, theirs = model.model.embed_tokens, pm.base_model.model.model.embed_tokens
    assert torch.equal(ours.lora_embedding_A["default"], torch.zeros(4, VOCAB))
    assert torch.equal(ours.lora_embedding_B["default"], theirs.lora_embedding_B["default"])
    assert ours.lora_embedding_B["default"].abs().sum() > 0
    assert torch.equal(logits(model, ids), logits(llama, ids))


class _Tokens(nn.Module):
    """An embedding with every option F.embedding takes, then a linear read-out."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.emb = emb
        self.out = nn.Linear(emb.embedding_dim, 3)

    def forward(self, x):
        return self.out(self.emb(x))


class _ScaledEmbedding(nn.Embedding):
    """Gemma-style: the lookup multiplied by embed_scale in forward."""

    def __init__(self, *args, scale, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.embed_scale.to(self.weight.dtype)


EMBEDDINGS = {
    "padding-scale_grad": lambda: nn.Embedding(20, 6, padding_idx=3, scale_grad_by_freq=True),
    "max_norm": lambda: nn.Embedding(20, 6, max_norm=1.5, norm_type=1.0),
    "embed_scale": lambda: _ScaledEmbedding(20, 6, scale=2.5),
}


@pytest.mark.parametrize("kind", list(EMBEDDINGS))
def test_embedding_options_match_peft(kind):
    torch.manual_seed(3)
    base = _Tokens(EMBEDDINGS[kind]())
    pm, model = _pair(base, dict(r=3, lora_alpha=6, target_modules=["emb"]))
    x = torch.tensor([[3, 1, 3, 7, 19], [0, 3, 3, 3, 5]])
    y_theirs, y_ours = pm(x), model(x)
    assert not torch.allclose(y_ours, base(x))
    assert_close(y_ours, y_theirs, TOL, "output")
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    g_theirs, g_ours = _grads(pm, PREFIX), _grads(model)
    assert g_ours.keys() == g_theirs.keys() == {"emb.lora_embedding_A.default", "emb.lora_embedding_B.default"}
    for n in g_ours:
        assert_close(g_ours[n], g_theirs[n], TOL, f"grad {n}")
    if kind == "max_norm":  # F.embedding renormalises the looked-up rows of Aᵀ in place, in both
        assert_close(model.emb.lora_embedding_A["default"], pm.base_model.model.emb.lora_embedding_A["default"], TOL, "A")
    if kind == "padding-scale_grad":
        assert g_ours["emb.lora_embedding_A.default"][:, 3].abs().sum() == 0


def test_bf16_table_keeps_fp32_adapters_and_matches_peft(llama, ids):
    base = copy.deepcopy(llama).to(torch.bfloat16)
    pm, model = _pair(base, dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    ours, theirs = model.model.embed_tokens, pm.base_model.model.model.embed_tokens
    assert ours.lora_embedding_A["default"].dtype == theirs.lora_embedding_A["default"].dtype == torch.float32
    y = ours(ids)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, theirs(ids))


# -------------------------------------------------------------------- merge, unload


@pytest.mark.parametrize("case", ["llama-embed-linear", "bert-word-embeddings"])
def test_merge_unmerge_unload_match_peft(case, request, ids):
    fixture, kwargs = CASES[case]
    base = request.getfixturevalue(fixture)
    pm, model = _pair(base, kwargs)
    unmerged = logits(model, ids)
    table = model.get_input_embeddings().base_layer.weight.detach().clone()
    tied = fixture == "bert"  # BERT's decoder shares word_embeddings' table
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakern.merge(model)
    assert any("tied word embeddings" in str(w.message) for w in caught) == tied
    emb = model.get_input_embeddings()
    assert emb.merged_adapters == ["default"]
    delta = emb.get_delta_weight("default")
    assert delta.shape == table.shape  # the table's layout, [num_embeddings, embedding_dim]
    assert_close(emb.base_layer.weight, table + delta, TOL, "merged table")
    if not tied:  # merged, the model computes what it computed unmerged
        assert_close(logits(model, ids), unmerged, TOL, "merged logits")
    lorakern.unmerge(model)
    _assert_round_trip(emb.base_layer.weight, table, delta)
    assert_close(logits(model, ids), unmerged, TOL, "unmerged again")

    merged_theirs = pm.merge_and_unload()
    merged_ours = lorakern.unload(model, merge=True)
    assert isinstance(merged_ours.get_input_embeddings(), nn.Embedding)
    sd_ours, sd_theirs = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for k in sd_ours:
        assert_close(sd_ours[k], sd_theirs[k], TOL, k)
    assert_close(logits(merged_ours, ids), logits(merged_theirs, ids), TOL, "merge_and_unload logits")


def _assert_round_trip(after: torch.Tensor, before: torch.Tensor, delta: torch.Tensor) -> None:
    """A merge/unmerge round trip in fp32 rounds twice: each element within
    u·|W+ΔW| + u·(|W| + u·|W+ΔW|) of W (u = 2⁻²⁴, lorakern.merge's documented bound)."""
    u = 2.0 ** -24
    merged = (before.double() + delta.double()).abs()
    bound = u * merged + u * (before.double().abs() + u * merged)
    err = (after.double() - before.double()).abs()
    assert (err <= bound).all(), f"round trip moved the table by {float((err - bound).max()):.3g} beyond the bound"


def test_unload_without_merge_gives_the_base_back(llama, ids):
    _, model = _pair(llama, CASES["llama-embed"][1])
    delta = model.model.embed_tokens.get_delta_weight("default")
    lorakern.merge(model)
    plain = lorakern.unload(model, merge=False)
    assert type(plain.model.embed_tokens) is nn.Embedding
    _assert_round_trip(plain.model.embed_tokens.weight, llama.model.embed_tokens.weight, delta)
    assert_close(logits(plain, ids), logits(llama, ids), TOL, "base logits")


def test_safe_merge_refuses_non_finite_and_changes_nothing(llama):
    _, model = _pair(llama, CASES["llama-embed-linear"][1])
    with torch.no_grad():
        model.model.embed_tokens.lora_embedding_B["default"][0, 0] = float("inf")
    before = full_state(model)
    with pytest.raises(ValueError, match=r"non-finite weights in \['model.embed_tokens'\]"):
        lorakern.merge(model, safe_merge=True)
    assert_same_state(model, before)
    assert not any(layer.merged for _, layer in lora_layers(model))


# --------------------------------------------------------- several adapters, switching


def _two_adapters(base, ids):
    """PEFT and lorakern models with adapters "default" (embed_tokens, q_proj) and "b"
    (embed_tokens, v_proj), the same weights in both."""
    k1 = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    k2 = dict(r=2, lora_alpha=3, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**k1))
    pm.add_adapter("b", peft.LoraConfig(**k2))
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**k1))
    lorakern.inject(model, lorakern.LoraConfig(**k2), adapter_name="b")
    model.load_state_dict({n.removeprefix(PREFIX): p for n, p in pm.state_dict().items()})
    return pm.eval(), model.eval()


def test_set_adapter_disable_and_delete_match_peft(llama, ids):
    pm, model = _two_adapters(llama, ids)
    emb = model.model.embed_tokens
    assert emb.held_adapters() == ["default", "b"]
    assert_close(logits(model, ids), logits(pm, ids), TOL, "default")
    lorakern.set_adapter(model, "b")
    pm.set_adapter("b")
    assert_close(logits(model, ids), logits(pm, ids), TOL, "b")
    assert not emb.lora_embedding_A["default"].requires_grad and emb.lora_embedding_A["b"].requires_grad
    lorakern.set_adapter(model, ["default", "b"])
    pm.base_model.set_adapter(["default", "b"])
    assert_close(logits(model, ids), logits(pm, ids), TOL, "both (summed)")
    with lorakern.disable_adapters(model):
        assert torch.equal(logits(model, ids), logits(llama, ids)), "disabled"
    assert_close(logits(model, ids), logits(pm, ids), TOL, "both again")

    lorakern.delete_adapter(model, "default")
    pm.delete_adapter("default")
    assert emb.held_adapters() == ["b"] and model.model.embed_tokens is emb
    assert_close(logits(model, ids), logits(pm, ids), TOL, "b after deleting default")
    lorakern.delete_adapter(model, "b")
    assert type(model.model.embed_tokens) is nn.Embedding
    assert torch.equal(logits(model, ids), logits(llama, ids)), "all deleted"


def test_merged_embedding_is_unmerged_by_set_adapter(llama, ids):
    _, model = _two_adapters(llama, ids)
    emb = model.model.embed_tokens
    table = emb.base_layer.weight.detach().clone()
    delta = emb.get_delta_weight("default")
    lorakern.merge(model)
    assert emb.merged_adapters == ["default"]
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        lorakern.set_adapter(model, "b")
    assert not emb.merged
    _assert_round_trip(emb.base_layer.weight, table, delta)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_add_weighted_adapter_matches_peft(combination_type, llama, ids):
    pm, model = _two_adapters(llama, ids)
    weights = [0.7, -1.3]
    pm.add_weighted_adapter(["default", "b"], weights, "mix", combination_type=combination_type)
    lorakern.add_weighted_adapter(model, ["default", "b"], weights, "mix", combination_type=combination_type)
    ours, theirs = model.model.embed_tokens, pm.base_model.model.model.embed_tokens
    assert "mix" in ours.held_adapters()
    assert not any(p.requires_grad for p in ours.adapter_parameters("mix"))
    assert_close(ours.get_delta_weight("mix"), theirs.get_delta_weight("mix"), TOL, "embedding delta")
    if combination_type == "cat":  # exact: the weighted sum of the deltas
        expected = 0.7 * ours.get_delta_weight("default") - 1.3 * ours.get_delta_weight("b")
        assert_close(ours.get_delta_weight("mix"), expected, TOL, "cat is exact")
    pm.set_adapter("mix")
    lorakern.set_adapter(model, "mix")
    assert_close(logits(model, ids), logits(pm, ids), TOL, "logits with the combined adapter")


# ------------------------------------------------------------------------ mixed batches


def test_mixed_batch_matches_peft(llama):
    pm, model = _two_adapters(llama, None)
    ids = input_ids(batch=4)
    names = ["b", "__base__", "default", "b"]
    with lorakern.mixed_batch(model, names):
        ours = logits(model, ids)
    with torch.no_grad():
        theirs = pm(input_ids=ids, adapter_names=names).logits
    assert_close(ours, theirs, TOL, "mixed batch")
    for row, name in enumerate(names):  # each row as if run alone with its adapter
        if name == "__base__":
            alone = logits(llama, ids[row:row + 1])
        else:
            lorakern.set_adapter(model, name)
            alone = logits(model, ids[row:row + 1])
        assert_close(ours[row:row + 1], alone, TOL, f"row {row} ({name})")


def test_mixed_batch_beam_search_matches_peft(llama):
    """generate(num_beams=2): the embedding sees the beam-expanded rows, each name repeated
    for its beams (mixed_batch(..., num_beams=2)), as PEFT's generate(adapter_names=...)."""
    pm, model = _two_adapters(llama, None)
    ids = input_ids(batch=3)
    names = ["b", "__base__", "default"]
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        with lorakern.mixed_batch(model, names, num_beams=2):
            ours = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        theirs = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
    assert torch.equal(ours, theirs)


def test_mixed_batch_trains_only_the_adapters_used(llama):
    _, model = _two_adapters(llama, None)
    emb = model.model.embed_tokens
    lorakern.set_adapter(model, ["default", "b"])  # both trainable
    model.train()
    ids = input_ids(batch=3)
    with lorakern.mixed_batch(model, ["b", "__base__", "b"]):
        model(input_ids=ids, labels=ids).loss.backward()
    assert emb.lora_embedding_A["default"].grad is None
    assert emb.lora_embedding_A["b"].grad.abs().sum() > 0


def test_layer_mixed_forward_checks_names_and_merges():
    layer = LoraEmbedding(nn.Embedding(10, 4), r=2, init_lora_weights=False)
    layer.update_layer("b", 3, 6, init_lora_weights=False)
    x = torch.tensor([[1, 2], [3, 4], [5, 6]])
    y = layer(x, adapter_names=["b", "__base__", "default"])
    layer.set_adapter("b")
    assert_close(y[0], layer(x[0]), TOL, "row 0")
    assert_close(y[1], layer.base_layer(x[1]), TOL, "row 1")
    with pytest.raises(ValueError, match=r"no adapter named \['c'\] in this layer"):
        layer(x, adapter_names=["c", "b", "b"])
    with pytest.raises(ValueError, match="give one name per row"):
        layer(x, adapter_names=["b", "b"])
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer(x, adapter_names=["b", "b", "b"])


# ----------------------------------------------------------------------- adapter files


@pytest.mark.parametrize("case", ["llama-embed-linear", "gpt2-wte-conv1d", "bert-word-embeddings"])
def test_peft_saved_adapter_loads_in_lorakern(case, request, ids, tmp_path):
    fixture, kwargs = CASES[case]
    base = request.getfixturevalue(fixture)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{**kwargs, "init_lora_weights": True}))
    train_steps(pm, ids)
    pm.save_pretrained(tmp_path)
    ref = logits(pm, ids)
    assert not torch.allclose(ref, logits(base, ids))
    keys = set(load_file(tmp_path / ST))
    assert any(k.endswith(".lora_embedding_A") for k in keys) and any(k.endswith(".lora_embedding_B") for k in keys)

    model = lorakern.load_adapter(copy.deepcopy(base), tmp_path)
    assert _embedding_names(model)
    assert_close(logits(model, ids), ref, TOL, "logits")
    assert not any(p.requires_grad for p in model.parameters())  # is_trainable=False, as PEFT


@pytest.mark.parametrize("case", ["llama-embed-linear", "gpt2-wte-conv1d", "bert-word-embeddings"])
def test_lorakern_saved_adapter_loads_in_peft(case, request, ids, tmp_path):
    fixture, kwargs = CASES[case]
    base = request.getfixturevalue(fixture)
    model = lorakern.inject(copy.deepcopy(base), lorakern.LoraConfig(**{**kwargs, "init_lora_weights": True}))
    train_steps(model, ids)
    ref = logits(model, ids)
    assert not torch.allclose(ref, logits(base, ids))
    lorakern.save_adapter(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(logits(pm, ids), ref, TOL, "logits")
    # PEFT saves the same keys for the same config (save_embedding_layers="auto" included).
    pm.save_pretrained(tmp_path / "theirs")
    assert set(load_file(tmp_path / "ours" / ST)) == set(load_file(tmp_path / "theirs" / ST))


def test_saved_keys_and_shapes(llama, tmp_path):
    model = lorakern.inject(copy.deepcopy(llama), lorakern.LoraConfig(r=4, target_modules=["embed_tokens"]))
    lorakern.save_adapter(model, tmp_path, save_embedding_layers=False)
    tensors = load_file(tmp_path / ST)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"{PREFIX}model.embed_tokens.lora_embedding_A": (4, VOCAB),
        f"{PREFIX}model.embed_tokens.lora_embedding_B": (64, 4),
    }


def test_load_into_existing_adapter_replaces_the_embedding_weights(llama, ids, tmp_path):
    kwargs = CASES["llama-embed-linear"][1]
    src = lorakern.inject(copy.deepcopy(llama), lorakern.LoraConfig(**kwargs, init_lora_weights=False))
    lorakern.save_adapter(src, tmp_path)
    model = lorakern.inject(copy.deepcopy(llama), lorakern.LoraConfig(**kwargs))
    emb = model.model.embed_tokens
    lorakern.load_adapter(model, tmp_path, is_trainable=True)
    assert model.model.embed_tokens is emb
    assert torch.equal(emb.lora_embedding_B["default"], src.model.embed_tokens.lora_embedding_B["default"])
    assert emb.lora_embedding_A["default"].requires_grad
    assert_close(logits(model, ids), logits(src, ids), TOL, "logits")


def _assert_load_fails(model, path, exc, match, **kwargs):
    before = full_state(model)
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = getattr(model, "_lorakern", None)
    configs = dict(state.configs) if state is not None else None
    with pytest.raises(exc, match=match):
        lorakern.load_adapter(model, path, **kwargs)
    assert_same_state(model, before)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert (dict(adapter_state(model).configs) if configs is not None else None) == configs


@pytest.fixture
def saved_embed(llama, tmp_path):
    model = lorakern.inject(copy.deepcopy(llama), lorakern.LoraConfig(**CASES["llama-embed-linear"][1], init_lora_weights=False))
    path = tmp_path / "adapter"
    lorakern.save_adapter(model, path)
    return path


def _rewrite(path, dest, edit):
    tensors = load_file(path / ST)
    edit(tensors)
    dest.mkdir()
    (dest / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    save_file(tensors, dest / ST, metadata={"format": "pt"})  # no lorakern record: PEFT-like
    return dest


@pytest.mark.parametrize("problem", ["wrong-rank", "nan", "missing", "as-linear-keys"])
@pytest.mark.parametrize("target", ["fresh", "existing"])
def test_bad_embedding_file_is_refused_and_changes_nothing(llama, saved_embed, tmp_path, problem, target):
    key = f"{PREFIX}model.embed_tokens.lora_embedding_A"

    def edit(t):
        if problem == "wrong-rank":
            t[key] = torch.randn(3, VOCAB)
        elif problem == "nan":
            t[key][1, 2] = float("nan")
        elif problem == "missing":
            del t[key]
        else:  # a linear layer's key names for an embedding target
            t[f"{PREFIX}model.embed_tokens.lora_A.weight"] = t.pop(key)

    bad = _rewrite(saved_embed, tmp_path / "bad", edit)
    model = copy.deepcopy(llama)
    if target == "existing":
        lorakern.inject(model, lorakern.LoraConfig(**CASES["llama-embed-linear"][1]))
    match = {
        "wrong-rank": r"lora_embedding_A: expected shape \[4, 128\], found \[3, 128\] \(rank 3 in the file",
        "nan": "non-finite", "missing": "missing keys.*lora_embedding_A",
        "as-linear-keys": r"unexpected keys.*embed_tokens\.lora_A\.weight",
    }[problem]
    _assert_load_fails(model, bad, AdapterLoadError, match)
    if target == "fresh":
        assert not hasattr(model, "_lorakern") and type(model.model.embed_tokens) is nn.Embedding


@pytest.mark.parametrize("target", ["fresh", "existing"])
def test_failure_while_writing_rolls_back(llama, saved_embed, monkeypatch, target):
    """A failure after validation (an OOM, ^C) while the values are written: everything
    undone, the LoraEmbedding injected for the load included."""
    model = copy.deepcopy(llama)
    if target == "existing":
        lorakern.inject(model, lorakern.LoraConfig(**CASES["llama-embed-linear"][1]))
    real = adapters_mod._write_values

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("interrupted (simulated)")

    monkeypatch.setattr(adapters_mod, "_write_values", write_then_fail)
    _assert_load_fails(model, saved_embed, KeyboardInterrupt, "simulated", is_trainable=True)
    if target == "fresh":
        assert type(model.model.embed_tokens) is nn.Embedding


# ---------------------------------------------------------------------- refused combos


@pytest.mark.parametrize("option, match", [
    (dict(use_dora=True), r"embed_tokens.*use_dora=True \(DoRA\) is not implemented for embeddings"),
    (dict(lora_bias=True), r"embed_tokens.*lora_bias=True is not supported for embeddings"),
])
def test_unsupported_options_on_embeddings_are_refused(llama, option, match):
    model = copy.deepcopy(llama)
    before = full_state(model)
    with pytest.raises(ValueError, match=match):
        lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], **option))
    assert_same_state(model, before)
    assert not hasattr(model, "_lorakern")


def test_unsupported_options_in_a_file_are_refused(llama, saved_embed, tmp_path):
    import json

    bad = tmp_path / "dora"
    bad.mkdir()
    cfg = json.loads((saved_embed / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / ST).write_bytes((saved_embed / ST).read_bytes())
    model = copy.deepcopy(llama)
    _assert_load_fails(model, bad, AdapterLoadError, "DoRA")


def test_layer_refuses_what_it_does_not_support():
    with pytest.raises(TypeError, match="base_layer must be nn.Embedding, got Linear"):
        LoraEmbedding(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="use_dora"):
        LoraEmbedding(nn.Embedding(10, 4), use_dora=True)
    with pytest.raises(ValueError, match="lora_bias"):
        LoraEmbedding(nn.Embedding(10, 4), lora_bias=True)
    layer = LoraEmbedding(nn.Embedding(10, 4), r=2)
    before = set(layer.state_dict())
    for kwargs in (dict(r=0), dict(r=2, init_lora_weights="bogus"), dict(r=2, use_dora=True)):
        with pytest.raises(ValueError):
            layer.update_layer("other", lora_alpha=4, **kwargs)
    assert set(layer.state_dict()) == before
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.update_layer("default", 2, 4)


class _Quantized(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.emb.weight = nn.Parameter(torch.zeros(10, 4, dtype=torch.int8), requires_grad=False)
        self.bag = nn.EmbeddingBag(10, 4)


def test_quantized_and_bag_embeddings_are_refused():
    with pytest.raises(TypeError, match="quantized embedding tables is not implemented"):
        lorakern.inject(_Quantized(), lorakern.LoraConfig(r=2, target_modules=["emb"]))
    with pytest.raises(TypeError, match="EmbeddingBag; lorakern.s LoRA supports nn.Linear, transformers Conv1D, nn.Embedding and nn.Conv1d"):
        lorakern.inject(_Quantized(), lorakern.LoraConfig(r=2, target_modules=["bag"]))


def test_all_linear_does_not_take_embeddings(llama):
    model = lorakern.inject(copy.deepcopy(llama), lorakern.LoraConfig(r=2, target_modules="all-linear"))
    assert not _embedding_names(model)


def test_frozen_load_freezes_every_adapter_parameter(tmp_path):
    """set_adapter keeps an adapter loaded with is_trainable=False frozen through the layers'
    adapter_parameters(): A and B of a LoraEmbedding, and DoRA's magnitude of a LoraLinear
    (which the A / B-only freeze used to leave trainable)."""

    def build():
        torch.manual_seed(0)
        return _Tokens(nn.Embedding(12, 8))

    for cfg in (dict(target_modules=["emb", "out"]), dict(target_modules=["out"], use_dora=True)):
        path = tmp_path / str(len(list(tmp_path.iterdir())))
        lorakern.save_adapter(lorakern.inject(build(), lorakern.LoraConfig(r=2, **cfg)), path)
        model = lorakern.load_adapter(build(), path)
        assert not [n for n, p in model.named_parameters() if p.requires_grad], cfg
        lorakern.load_adapter(model, path, adapter_name="other", is_trainable=True)
        lorakern.set_adapter(model, ["default", "other"])
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".other" in n for n in trainable), trainable


def test_sparse_table_trains_with_a_dense_adapter_gradient():
    """Over an nn.Embedding(sparse=True) the adapter's lookup is dense (PEFT's sparse lookup
    of Aᵀ fails in backward): the same gradients as over the same table with sparse=False."""
    grads = []
    for sparse in (False, True):
        torch.manual_seed(4)
        layer = LoraEmbedding(nn.Embedding(12, 5, sparse=sparse), r=3, init_lora_weights=False)
        layer(torch.tensor([[1, 2, 2, 11]])).square().sum().backward()
        grads.append([p.grad for p in layer.adapter_parameters("default")])
    for dense, from_sparse in zip(*grads):
        assert from_sparse.layout == torch.strided
        assert torch.equal(dense, from_sparse)
