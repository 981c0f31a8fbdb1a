"""Shared builders for the model / adapter / PEFT-interop tests (no tests in here).

Tiny Hugging Face models built from configs with random weights (no network), and a
plain MLP. Every builder is deterministic (own seed) so two calls give equal models.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

VOCAB = 128


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4321)
    cfg = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(cfg).eval()
    # Random (not zero) biases everywhere, so bias handling is visible in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


class MLP(nn.Module):
    """A plain nn.Module: blocks.<i>.{up, down} and a head."""

    def __init__(self, d: int = 16, hidden: int = 24, layers: int = 3, out: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(d, hidden), "down": nn.Linear(hidden, d)}) for _ in range(layers)
        )
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["down"](torch.relu(block["up"](x)))
        return self.head(x)


def tiny_mlp() -> MLP:
    torch.manual_seed(99)
    return MLP()


def input_ids(batch: int = 2, seq: int = 9, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def train_steps(model: nn.Module, ids: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps of causal-LM loss on the trainable parameters, then eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Deep copy of the whole state dict, for 'nothing changed' checks."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), (
        f"state-dict keys changed: +{sorted(set(after) - set(before))[:5]} -{sorted(set(before) - set(after))[:5]}"
    )
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
