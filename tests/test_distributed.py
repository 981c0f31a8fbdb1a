"""DDP and FSDP2 on a LoRA-injected model: PyTorch's own engines, nothing home-made.

Two processes on the gloo backend (CPU) train the tiny model on different halves of each
batch; the adapters must end identical across ranks and equal (fp32, 1e-5) to one process
trained on the whole batch. FSDP2 (`fully_shard`) runs on gloo/CPU with this torch, so it
is tested here too, including saving the adapter from the sharded model.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lorakern
from lorakern.distributed import full_tensor, is_sharded
from tests.training_utils import HIDDEN, K, lora_layers, tiny_lora_model
from tests.utils import RTOL, assert_close

WORLD, STEPS, BATCH, LR = 2, 3, 8, 0.5

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 5, K, generator=g)


def _train(model, forward, rank: int | None) -> None:
    """STEPS of SGD on mean(out²); rank None = the whole batch, else this rank's half."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        x = _batch(step)
        if rank is not None:
            x = x.chunk(WORLD)[rank]
        forward(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _single_process_adapters() -> dict[str, torch.Tensor]:
    model = tiny_lora_model()
    _train(model, model, rank=None)
    return _adapters(model)


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))


def _run(worker, tmp_path: Path, monkeypatch) -> None:
    # Gloo's pair sockets bind to the address the host name resolves to unless told an
    # interface; keep every byte on loopback (the spawned workers inherit the variable).
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)


def _check_against_single_process(states: list[dict[str, torch.Tensor]]) -> None:
    initial = _adapters(tiny_lora_model())
    single = _single_process_adapters()
    assert len(single) == 4
    for state in states:
        assert state.keys() == single.keys()
    for name, ref in single.items():
        for rank in range(1, WORLD):
            assert torch.equal(states[rank][name], states[0][name]), f"{name} differs between ranks"
        assert not torch.equal(ref, initial[name]), f"{name} did not train"
        assert_close(states[0][name], ref, RTOL[torch.float32], name)


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = tiny_lora_model()
        base_before = model.up.base_layer.weight.detach().clone()
        # Frozen base: DDP only tracks parameters that require grad, every one of which
        # gets a gradient, so find_unused_parameters=False is right.
        ddp = DDP(model, find_unused_parameters=False)
        _train(model, ddp, rank)
        assert torch.equal(model.up.base_layer.weight, base_before)
        torch.save(_adapters(model), Path(out) / f"ddp{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path, monkeypatch):
    _run(_ddp_worker, tmp_path, monkeypatch)
    _check_against_single_process([torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)])


# ----------------------------------------------------------------------------- FSDP2


def _fsdp_worker(rank: int, port: int, out: str) -> None:
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
        _train(model, model, rank)
        torch.save(_adapters(model), Path(out) / f"fsdp{rank}.pt")
        lorakern.save_adapter(model, Path(out) / f"adapter{rank}")  # collective: every rank
    finally:
        dist.destroy_process_group()


def test_fsdp2_matches_single_process_and_saves_full_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (torch.distributed.fsdp.fully_shard)")
    _run(_fsdp_worker, tmp_path, monkeypatch)
    states = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(WORLD)]
    _check_against_single_process(states)

    # The adapter saved from the sharded model is the same PEFT file an unsharded model
    # writes: same keys, full shapes, dtypes and config; tensors = the gathered params.
    unsharded = tiny_lora_model()
    _train(unsharded, unsharded, rank=None)
    lorakern.save_adapter(unsharded, tmp_path / "unsharded")
    ref = load_file(tmp_path / "unsharded" / "adapter_model.safetensors")
    ref_config = json.loads((tmp_path / "unsharded" / "adapter_config.json").read_text())
    assert len(ref) == 4
    for rank in range(WORLD):
        saved = load_file(tmp_path / f"adapter{rank}" / "adapter_model.safetensors")
        assert saved.keys() == ref.keys()
        for key, t in ref.items():
            assert saved[key].shape == t.shape and saved[key].dtype == t.dtype, key
            assert_close(saved[key], t, RTOL[torch.float32], key)
            param = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            assert torch.equal(saved[key], states[rank][param]), key
        assert json.loads((tmp_path / f"adapter{rank}" / "adapter_config.json").read_text()) == ref_config
