"""DDP and FSDP2 on a LoRA-injected model: PyTorch's own engines, nothing home-made.

Two processes on the gloo backend (CPU) train the tiny model on different halves of each
batch; the adapters must end identical across ranks and equal (fp32, 1e-5) to one process
trained on the whole batch. FSDP2 (`fully_shard`) runs on gloo/CPU with this torch, so it
is tested here too, including saving the adapter from the sharded model. The two ranks
run in tests/distributed_workers.py, launched as a separate program (own session, time
limit), so a hung or killed gloo job fails its test and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lorakern
from tests.distributed_workers import WORLD, adapters, train
from tests.training_utils import tiny_lora_model
from tests.utils import RTOL, assert_close

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def _single_process_adapters() -> dict[str, torch.Tensor]:
    model = tiny_lora_model()
    train(model, model, rank=None)
    return adapters(model)


def _run(job: str, tmp_path: Path) -> None:
    """Run the two-rank `job` (tests/distributed_workers.py) and fail with its output if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.distributed_workers", job, str(tmp_path)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        out, _ = proc.communicate()
        pytest.fail(f"{job} job did not finish in {JOB_TIMEOUT_S} s; output:\n{out}")
    assert proc.returncode == 0, f"{job} job exited with {proc.returncode}; output:\n{out}"


def _check_against_single_process(states: list[dict[str, torch.Tensor]]) -> None:
    initial = adapters(tiny_lora_model())
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


def test_ddp_matches_single_process(tmp_path):
    _run("ddp", tmp_path)
    _check_against_single_process([torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)])


# ----------------------------------------------------------------------------- FSDP2


def test_fsdp2_matches_single_process_and_saves_full_adapter(tmp_path):
    from safetensors.torch import load_file

    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (torch.distributed.fsdp.fully_shard)")
    _run("fsdp", tmp_path)
    states = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(WORLD)]
    _check_against_single_process(states)

    # The adapter saved from the sharded model is the same PEFT file an unsharded model
    # writes: same keys, full shapes, dtypes and config; tensors = the gathered params.
    unsharded = tiny_lora_model()
    train(unsharded, unsharded, rank=None)
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
