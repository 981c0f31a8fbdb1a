"""The two-process DDP / FSDP2 jobs of test_distributed, run as their own program:

    python -m tests.distributed_workers ddp|fsdp OUT_DIR

The test launches this in a new process session with a time limit, so a hung or killed
gloo job fails that one test with its output instead of taking the test run with it.
Each rank trains the tiny LoRA model on its half of every batch and saves its adapters
(and, for FSDP2, a PEFT adapter directory) under OUT_DIR.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lorakern
from lorakern.distributed import full_tensor, is_sharded
from tests.training_utils import HIDDEN, K, lora_layers, tiny_lora_model

WORLD, STEPS, BATCH, LR = 2, 3, 8, 0.5


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 5, K, generator=g)


def train(model, forward, rank: int | None) -> None:
    """STEPS of SGD on mean(out²); rank None = the whole batch, else this rank's half."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        x = batch(step)
        if rank is not None:
            x = x.chunk(WORLD)[rank]
        forward(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def adapters(model) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))


def ddp_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = tiny_lora_model()
        base_before = model.up.base_layer.weight.detach().clone()
        # Frozen base: DDP only tracks parameters that require grad, every one of which
        # gets a gradient, so find_unused_parameters=False is right.
        ddp = DDP(model, find_unused_parameters=False)
        train(model, ddp, rank)
        assert torch.equal(model.up.base_layer.weight, base_before)
        torch.save(adapters(model), Path(out) / f"ddp{rank}.pt")
        # Free DDP's reducer while its process group is alive: destroyed after
        # destroy_process_group (when this frame's locals go), it hung one run in ~8.
        del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fsdp_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        from torch.distributed.fsdp import fully_shard

        model = tiny_lora_model()
        # Recommended wrapping (README): one FSDP unit per block (here per LoraLinear),
        # frozen base and trainable adapters together, then the root.
        for layer in lora_layers(model):
            fully_shard(layer)
        fully_shard(model)
        assert all(is_sharded(p) for p in model.parameters())
        assert model.up.lora_B["default"].weight.to_local().shape == (HIDDEN // WORLD, 4)
        train(model, model, rank)
        torch.save(adapters(model), Path(out) / f"fsdp{rank}.pt")
        lorakern.save_adapter(model, Path(out) / f"adapter{rank}")  # collective: every rank
        del model  # as in ddp_worker: nothing holding the group outlives it
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKERS = {"ddp": ddp_worker, "fsdp": fsdp_worker}

if __name__ == "__main__":
    job, out = sys.argv[1], sys.argv[2]
    # Gloo's pair sockets bind to the address the host name resolves to unless told an
    # interface: keep every byte on loopback (the spawned ranks inherit the variable).
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    mp.spawn(WORKERS[job], args=(_free_port(), out), nprocs=WORLD, join=True)
