"""transformers' Trainer (and TRL's SFTTrainer) on lorakern-injected models (lorakern.hf).

Tiny Llama built from a config, LoRA on every linear layer plus lm_head in
modules_to_save, 6 steps on CPU in fp32:
- `save_model()` and every `checkpoint-N` are adapter-only PEFT directories (no base weight);
- resuming from a checkpoint restores the adapter and gives the uninterrupted run's losses;
- the final directory loads with `PeftModel.from_pretrained` and `lorakern.load_adapter`
  and gives the trained model's logits;
- gradient checkpointing, bf16 mixed precision and torch.compile (aot_eager) train and save;
- clear errors for a model with nothing to train and for fp16 adapters under fp16.
"""

from __future__ import annotations

import copy
import io
import json
import shutil

import pytest
import torch

import lorakern
from lorakern.adapters import PREFIX, adapter_state_dict

pytestmark = pytest.mark.usefixtures("quiet_warnings")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from lorakern import hf  # noqa: E402

STEPS, SAVE_STEPS = 6, 2
FULL_WEIGHTS = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", modules_to_save=["lm_head"])


def tiny_llama() -> LlamaForCausalLM:
    """The base: the same weights on every call."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def lora_model() -> LlamaForCausalLM:
    return lorakern.inject(tiny_llama(), lorakern.LoraConfig(**LORA))


def sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (16,), generator=g).tolist() for _ in range(32)]


def dataset() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.tensor(s), "labels": torch.tensor(s)} for s in sequences()]


def training_args(out, cls=TrainingArguments, **kw):
    base = dict(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_STEPS, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e-2, seed=0, data_seed=0, report_to="none", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return cls(**{**base, **kw})


def train(out, model=None, trainer_cls=None, resume=None, eval_dataset=None, **kw):
    """(model, trainer, {step: loss}) after a Trainer run into `out`."""
    model = lora_model() if model is None else model
    trainer = (trainer_cls or hf.Trainer)(
        model=model, args=training_args(out, **kw), train_dataset=dataset(), eval_dataset=eval_dataset
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return model, trainer, losses(trainer)


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def checkpoints(out) -> list:
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def assert_adapter_only(path, model) -> None:
    """`path` is a PEFT adapter directory of exactly `model`'s adapter tensors: no base weight."""
    files = {p.name for p in path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files, files
    assert not files & FULL_WEIGHTS, files
    saved = load_file(path / "adapter_model.safetensors")
    expected = adapter_state_dict(model)
    assert set(saved) == set(expected)
    # LoRA factors and the trained lm_head copy only: nothing of the frozen base.
    assert all(".lora_A." in k or ".lora_B." in k or k == f"{PREFIX}lm_head.weight" for k in saved), sorted(saved)[:6]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["lm_head"]


def assert_same_adapter(a, b, atol=0.0) -> None:
    sa, sb = adapter_state_dict(a), adapter_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=k)


def ids() -> torch.Tensor:
    return torch.tensor(sequences()[:3])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run: 6 steps, checkpoints every 2, then `save_model()`."""
    out = tmp_path_factory.mktemp("uninterrupted")
    model, trainer, steps = train(out)
    trainer.save_model()
    return model, out, steps


def test_save_model_and_every_checkpoint_are_adapter_only(uninterrupted):
    model, out, steps = uninterrupted
    assert sorted(steps) == list(range(1, STEPS + 1))
    ckpts = checkpoints(out)
    assert [c.name for c in ckpts] == [f"checkpoint-{s}" for s in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS)]
    for path in [out, *ckpts]:
        assert_adapter_only(path, model)
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {p.name for p in ckpts[0].iterdir()}
    # The final directory holds the trained values.
    saved = load_file(out / "adapter_model.safetensors")
    for k, v in adapter_state_dict(model).items():
        assert torch.equal(saved[k], v.detach()), k


def test_resume_restores_the_adapter_and_gives_the_uninterrupted_losses(uninterrupted, tmp_path):
    model, out, steps = uninterrupted
    shutil.copytree(out / f"checkpoint-{SAVE_STEPS}", tmp_path / f"checkpoint-{SAVE_STEPS}")
    fresh = lora_model()
    with torch.no_grad():  # losses can only match if the checkpoint's adapter replaces these
        for p in fresh.parameters():
            if p.requires_grad:
                p.normal_()
    resumed_model, trainer, resumed = train(tmp_path, model=fresh, resume=tmp_path / f"checkpoint-{SAVE_STEPS}")
    after = [s for s in resumed if s > SAVE_STEPS]
    assert after == list(range(SAVE_STEPS + 1, STEPS + 1))
    for s in after:
        assert abs(resumed[s] - steps[s]) <= 1e-6, (s, resumed[s], steps[s])
    assert_same_adapter(resumed_model, model, atol=1e-6)
    assert_adapter_only(tmp_path / f"checkpoint-{STEPS}", resumed_model)


def test_final_directory_loads_with_peft_and_lorakern(uninterrupted):
    peft = pytest.importorskip("peft")
    model, out, _ = uninterrupted
    x = ids()
    with torch.no_grad():
        want = model.eval()(input_ids=x).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(out)).eval()(input_ids=x).logits
        ours = lorakern.load_adapter(tiny_llama(), out).eval()(input_ids=x).logits
        # The output directory also holds checkpoint-N/ adapter directories: not adapters of the model.
        reloaded = hf.load_pretrained(lora_model(), out).eval()(input_ids=x).logits
    torch.testing.assert_close(theirs, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    torch.testing.assert_close(reloaded, want, rtol=0, atol=0)


def test_plain_transformers_trainer_saves_adapters(tmp_path):
    """No lorakern.hf.Trainer needed to save: Trainer calls the model's save_pretrained."""
    model, trainer, _ = train(tmp_path, trainer_cls=transformers.Trainer, max_steps=2)
    trainer.save_model()
    for path in [tmp_path, *checkpoints(tmp_path)]:
        assert_adapter_only(path, model)


def test_load_best_model_at_end(tmp_path):
    """lr=1 overshoots: the eval loss is best at step 2, and the model ends with that adapter."""
    model, trainer, _ = train(
        tmp_path, max_steps=4, eval_strategy="steps", eval_steps=SAVE_STEPS, load_best_model_at_end=True,
        eval_dataset=dataset()[:8], metric_for_best_model="loss", greater_is_better=False, learning_rate=1.0,
    )
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    current = adapter_state_dict(model)
    assert all(torch.equal(best[k], v.detach()) for k, v in current.items())
    assert not all(torch.equal(last[k], v.detach()) for k, v in current.items())


def test_gradient_checkpointing(uninterrupted, tmp_path):
    _, _, steps = uninterrupted
    model, _, ckpt = train(tmp_path, gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    # Recomputation replays the dropout masks (RNG state is restored): the same run.
    for s in steps:
        assert abs(ckpt[s] - steps[s]) <= 1e-6, (s, ckpt[s], steps[s])
    assert_adapter_only(checkpoints(tmp_path)[-1], model)


def test_bf16_mixed_precision(uninterrupted, tmp_path):
    _, _, steps = uninterrupted
    model, trainer, bf16 = train(tmp_path, bf16=True, max_steps=4)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # fp32 masters
    for s in bf16:
        assert abs(bf16[s] - steps[s]) < 2e-2, (s, bf16[s], steps[s])
    last = checkpoints(tmp_path)[-1]
    assert_adapter_only(last, model)
    assert lorakern.load_adapter(tiny_llama(), last) is not None


def test_torch_compile(uninterrupted, tmp_path):
    """torch_compile=True with the aot_eager backend (inductor on CPU works too, ~50 s)."""
    _, _, steps = uninterrupted
    torch._dynamo.reset()
    try:
        model, trainer, compiled = train(tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
    finally:
        torch._dynamo.reset()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    for s in steps:
        assert abs(compiled[s] - steps[s]) <= 1e-5, (s, compiled[s], steps[s])
    for path in checkpoints(tmp_path):
        assert_adapter_only(path, model)


def test_frozen_model_gets_a_clear_error_when_training_starts(uninterrupted, tmp_path):
    _, out, _ = uninterrupted
    model = lorakern.load_adapter(tiny_llama(), out)  # is_trainable=False: frozen, for inference
    lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="other")  # inactive
    trainer = hf.Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset())  # evaluation is fine
    with pytest.raises(ValueError, match=r"nothing to train.*\['default'\] were loaded for inference.*is_trainable=True"
                       r".*\['other'\] are inactive"):
        trainer.train()

    plain = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no lorakern adapter: call lorakern.inject"):
        hf.Trainer(model=plain, args=training_args(tmp_path), train_dataset=dataset()).train()


def test_fp16_adapters_under_fp16_mixed_precision(tmp_path):
    # No modules_to_save here: an upcast full copy of lm_head needs autocast, which CPU fp16 lacks.
    model = lorakern.inject(tiny_llama(), lorakern.LoraConfig(r=4, target_modules="all-linear"))
    model.half()  # casts the fp32 adapters too
    args = training_args(tmp_path, fp16=True, max_steps=1, save_strategy="no")
    with pytest.raises(ValueError, match=r"fp16=True.*float16 trainable.*upcast_trainable"):
        hf.Trainer(model=model, args=args, train_dataset=dataset()).train()
    hf.upcast_trainable(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}
    hf.Trainer(model=model, args=args, train_dataset=dataset()).train()


def test_sft_trainer_saves_and_resumes(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"t{i}": i for i in range(3, 128)}}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>", eos_token="</s>", bos_token="<s>",
    )
    data = datasets.Dataset.from_dict({"input_ids": sequences()})

    class SFTTrainer(hf.AdapterTrainerMixin, trl.SFTTrainer):
        pass

    def run(out, model, resume=None):
        args = training_args(out, cls=trl.SFTConfig, max_steps=4, bf16=False)  # SFTConfig checkpoints by default
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        return trainer

    model = lora_model()
    trainer = run(tmp_path / "a", model)
    assert trainer.args.gradient_checkpointing
    trainer.save_model()
    for path in [tmp_path / "a", *checkpoints(tmp_path / "a")]:
        assert_adapter_only(path, model)
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed_model = lora_model()
    resumed = run(tmp_path / "b", resumed_model, resume=tmp_path / "b" / "checkpoint-2")
    want, got = losses(trainer), losses(resumed)
    for s in (3, 4):
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])
    assert_same_adapter(resumed_model, model, atol=1e-6)


# ---- save_pretrained / load_pretrained without a Trainer ---------------------------------


def two_adapter_model() -> LlamaForCausalLM:
    model = lora_model()
    lorakern.inject(model, lorakern.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name="b")
    return model


def test_save_pretrained_layout_and_options(tmp_path):
    model = two_adapter_model()
    assert isinstance(vars(model)["save_pretrained"], hf._SavePretrained)
    model.save_pretrained(tmp_path / "all")
    assert hf.saved_adapters(tmp_path / "all") == {"default": tmp_path / "all", "b": tmp_path / "all" / "b"}
    model.save_pretrained(tmp_path / "sel", selected_adapters=["b"])
    assert hf.saved_adapters(tmp_path / "sel") == {"b": tmp_path / "sel" / "b"}
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    model.save_pretrained(tmp_path / "shard", max_shard_size="1GB")  # push_to_hub passes it: ignored
    with pytest.raises(TypeError, match="writes its adapters"):
        model.save_pretrained(tmp_path / "x", variant="fp16")
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])

    # A full state dict (DeepSpeed ZeRO-3 / FSDP FULL_STATE_DICT): values taken from it.
    sd = {k: v + 1 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "sd", state_dict=sd)
    saved = load_file(tmp_path / "sd" / "adapter_model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(saved[f"{PREFIX}{q}.lora_B.weight"], sd[f"{q}.lora_B.default.weight"])
    assert torch.equal(saved[f"{PREFIX}lm_head.weight"], sd["lm_head.modules_to_save.default.weight"])
    assert torch.equal(load_file(tmp_path / "sd" / "b" / "adapter_model.safetensors")[f"{PREFIX}{q}.lora_A.weight"],
                       sd[f"{q}.lora_A.b.weight"])
    with pytest.raises(ValueError, match="state_dict lacks"):
        model.save_pretrained(tmp_path / "x", state_dict={})


def test_save_pretrained_follows_copies_and_pickles(tmp_path):
    model = lora_model()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(3.0)
    clone.save_pretrained(tmp_path / "clone")
    assert_adapter_only(tmp_path / "clone", clone)
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
    assert (load_file(tmp_path / "clone" / "adapter_model.safetensors")[key] == 3.0).all()

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    unpickled = torch.load(buf, weights_only=False)
    unpickled.save_pretrained(tmp_path / "unpickled")
    assert_adapter_only(tmp_path / "unpickled", unpickled)


def test_save_pretrained_of_an_unloaded_model_is_transformers(tmp_path):
    model = lorakern.unload(lora_model())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
    assert not any("lora" in k for k in load_file(tmp_path / "model.safetensors"))


def test_inject_leaves_other_modules_alone():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lorakern.inject(mlp, lorakern.LoraConfig(r=2, target_modules=["0"]))
    assert "save_pretrained" not in vars(mlp)


def test_load_pretrained(tmp_path):
    model = two_adapter_model()
    model.save_pretrained(tmp_path)
    other = two_adapter_model()
    lorakern.load_adapter(other, tmp_path / "b", adapter_name="b")  # "b" for inference: stays frozen
    assert not other.model.layers[0].self_attn.q_proj.lora_A["b"].weight.requires_grad
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    hf.load_pretrained(other, tmp_path)
    assert_same_adapter(other, model)
    assert not other.model.layers[0].self_attn.q_proj.lora_A["b"].weight.requires_grad
    assert other.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad

    hf.load_pretrained(lora_model(), tmp_path)  # "b/" is not the model's: not looked at
    model.save_pretrained(tmp_path / "only-default", selected_adapters=["default"])
    with pytest.raises(ValueError, match=r"not saved there: \['b'\]"):
        hf.load_pretrained(two_adapter_model(), tmp_path / "only-default")
    with pytest.raises(FileNotFoundError):
        hf.load_pretrained(lora_model(), tmp_path / "empty")
