"""A tiny LoRA-injected model and a train step, shared by the training-integration tests
(test_compile, test_autocast, test_checkpoint, test_distributed)."""

from __future__ import annotations

import torch
from torch import nn

import lorakern

K, HIDDEN, N, RANK = 16, 24, 8, 4


class TinyMLP(nn.Module):
    """up [HIDDEN, K] -> ReLU -> down [N, HIDDEN]; x [..., K] -> [..., N]."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(K, HIDDEN)
        self.down = nn.Linear(HIDDEN, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def tiny_lora_model(*, dropout: float = 0.0, backend: str = "reference", seed: int = 0,
                    dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """TinyMLP with both linears injected (random A and B, so every gradient is non-zero).

    The base is built in `dtype`; adapters stay fp32 (PEFT's default).
    """
    torch.manual_seed(seed)
    model = TinyMLP().to(device=device, dtype=dtype)
    cfg = lorakern.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout,
                              target_modules=["up", "down"], init_lora_weights=False)
    lorakern.inject(model, cfg, backend=backend)
    assert isinstance(model.up, lorakern.LoraLinear) and isinstance(model.down, lorakern.LoraLinear)
    return model


def lora_layers(model: nn.Module) -> list[lorakern.LoraLinear]:
    return [m for m in model.modules() if isinstance(m, lorakern.LoraLinear)]


def train_step(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Seed torch, run forward + backward of mean(out²); return (out, {name: grad}) and clear grads."""
    torch.manual_seed(seed)
    out = model(x)
    out.float().square().mean().backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.detach().clone()  # a torch.compile wrapper's prefix
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return out.detach(), grads
