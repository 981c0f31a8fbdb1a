"""End-to-end: one LoRA training step of a Llama-style decoder, lorakern vs PEFT.

The model is built from a `transformers.LlamaConfig` with random weights (nothing is
downloaded), sized to the device (~1.1B parameters in bf16 on a GPU, a tiny fp32 model
on CPU). LoRA goes on every linear layer of the decoder (q, k, v, o, gate, up, down),
r = 16, alpha = 32, lora_dropout = 0.05. Both variants share the frozen weights' values,
start from the same A (B = 0, so their first losses must agree), see the same batch,
and train the adapters with AdamW, in the same process.

With `compile=True` each model also runs under `torch.compile` (inductor, default
options: graph breaks allowed, so PEFT is not held to a stricter bar than lorakern);
those rows are named "lorakern+compile" / "peft+compile", and their first warm-up
step, which includes compilation, is reported as `first_step_ms`.

The QLoRA variant (`run_e2e_qlora`, rows "lorakern-qlora" / "peft-qlora") trains the same
model with its decoder's linear layers stored 4-bit (NF4, double quantisation, blocksize 64,
compute dtype = the run's dtype; the output head stays dense, as both libraries leave it):
lorakern.quantize + lorakern.inject against transformers' BitsAndBytesConfig(load_in_4bit)
loading of the same weights (saved to a temporary folder) + peft.get_peft_model. Neither
runs peft.prepare_model_for_kbit_training (no gradient checkpointing, no fp32 norms), so
both train exactly what the dense rows train.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lorakern.bench.memory import SavedBytes
from lorakern.config import LoraConfig
from lorakern.model import inject

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class E2ESize:
    """Model and batch size of the end-to-end step."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    batch: int
    seq_len: int
    warmup_steps: int
    steps: int


SIZES = {
    # ~1.1B parameters: Llama-3.2-1B's widths with a 32k vocabulary.
    "1b": E2ESize("1b", 2048, 8192, 16, 32, 8, 32000, batch=4, seq_len=1024, warmup_steps=3, steps=10),
    "tiny": E2ESize("tiny", 256, 688, 2, 4, 2, 1024, batch=2, seq_len=128, warmup_steps=2, steps=5),
    # The 1B model's widths and batch with 2 layers: compiling 16 layers takes minutes of
    # a GPU lease, and per-layer throughput is what the compiled rows compare.
    "1b-2layer": E2ESize("1b-2layer", 2048, 8192, 2, 32, 8, 32000, batch=4, seq_len=1024, warmup_steps=3, steps=10),
    "micro": E2ESize("micro", 64, 128, 1, 4, 2, 128, batch=1, seq_len=32, warmup_steps=1, steps=2),
}


def size_for(device: torch.device, name: str = "auto") -> E2ESize:
    """The named size, or for "auto" "1b" on CUDA and "tiny" on CPU."""
    if name == "auto":
        name = "1b" if device.type == "cuda" else "tiny"
    if name not in SIZES:
        raise ValueError(f"e2e size must be auto or one of {sorted(SIZES)}, got {name!r}")
    return SIZES[name]


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_llama(size: E2ESize, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM of `size` on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        vocab_size=size.vocab_size,
        max_position_embeddings=max(2048, size.seq_len),
        use_cache=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def inject_lorakern(model: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """lorakern.inject with LoRA on TARGETS (LoraLinear, backend="auto"), in place."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGETS))
    return inject(model, config)


def inject_peft(model: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """peft.get_peft_model with LoRA on the same targets."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGETS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def _lora_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """'<path to layer>' -> (A weight, B weight) of the default adapter, for PEFT and lorakern models."""
    pairs = {}
    for name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if isinstance(lora_A, nn.ModuleDict) and "default" in lora_A:
            key = name.removeprefix("base_model.model.")
            pairs[key] = (lora_A["default"].weight, module.lora_B["default"].weight)
    return pairs


@torch.no_grad()
def copy_adapters(src: nn.Module, dst: nn.Module) -> int:
    """Copy every (A, B) of src into the same-named layer of dst; returns how many were copied."""
    s, d = _lora_pairs(src), _lora_pairs(dst)
    missing = sorted(set(s) ^ set(d))
    if missing:
        raise ValueError(f"adapter layers differ between the two models: {missing[:4]}")
    for key, (a, b) in s.items():
        d[key][0].copy_(a)
        d[key][1].copy_(b)
    return len(s)


@dataclass
class E2EResult:
    provider: str
    size: str
    params: int
    trainable_params: int
    tokens_per_step: int
    step_ms_median: float
    step_ms_p20: float
    step_ms_p80: float
    tokens_per_s: float
    peak_bytes: int | None
    saved_bytes: int
    loss_first: float
    loss_last: float
    compiled: bool
    first_step_ms: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _param_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, plus the statistics a bitsandbytes 4-bit weight keeps
    outside them (its QuantState: absmax, code book, nested absmax)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
            nested = getattr(state, "state2", None)
            if nested is not None:
                tensors += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def logical_params(model: nn.Module) -> int:
    """Parameter count with every quantized weight counted as its dense [out, in] (a 4-bit
    weight is stored as uint8 buffers or packed parameters, not as out·in elements)."""
    from lorakern.quantized import is_quantized_linear, quantized_weight

    total, skip = 0, set()
    for module in model.modules():
        if is_quantized_linear(module):
            n, k = quantized_weight(module).shape
            total += n * k
            skip.add(id(module.weight))
    return total + sum(p.numel() for p in model.parameters() if id(p) not in skip)


def train_steps(
    provider: str,
    model: nn.Module,
    ids: torch.Tensor,
    size: E2ESize,
    device: torch.device,
    tick: Callable[[str], None],
    compile: bool = False,
) -> E2EResult:
    """Warm-up then timed steps of forward + backward + AdamW on the adapters (the
    forward and backward under torch.compile when `compile`)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    forward = torch.compile(model) if compile else model

    def step() -> float:
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    with SavedBytes(exclude=list(model.parameters()) + list(model.buffers())) as saved:
        out = model(input_ids=ids, labels=ids)
    del out
    losses = []
    _sync(device)
    first, first_step_ms = time.perf_counter(), None
    for i in range(size.warmup_steps):
        losses.append(step())
        if i == 0:
            _sync(device)
            first_step_ms = (time.perf_counter() - first) * 1e3
        tick(f"e2e {provider} warm-up")
    # Peak of the timed steps only: warm-up runs autotuning and lorakern's measured
    # dispatch, whose timing buffers are not part of a training step.
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(size.steps):
        _sync(device)
        start = time.perf_counter()
        losses.append(step())
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        tick(f"e2e {provider}")
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before + _param_bytes(model)
    times.sort()
    q = lambda f: times[min(len(times) - 1, round(f * (len(times) - 1)))]  # noqa: E731
    tokens = ids.numel()
    return E2EResult(
        provider=provider,
        size=size.name,
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in params),
        tokens_per_step=tokens,
        step_ms_median=q(0.5),
        step_ms_p20=q(0.2),
        step_ms_p80=q(0.8),
        tokens_per_s=tokens / (q(0.5) * 1e-3),
        peak_bytes=peak,
        saved_bytes=saved.bytes,
        loss_first=losses[0],
        loss_last=losses[-1],
        compiled=compile,
        first_step_ms=first_step_ms,
    )


QLORA_FORMAT = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}


def quantize_lorakern(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """lorakern.quantize: the decoder's nn.Linear layers -> QuantLinear (NF4, double quant), in place."""
    from lorakern.quantized import quantize

    return quantize(model, QLORA_FORMAT["quant_type"], blocksize=QLORA_FORMAT["blocksize"],
                    double_quant=QLORA_FORMAT["double_quant"], compute_dtype=compute_dtype)


def load_bnb_4bit(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model`'s weights loaded back through transformers' BitsAndBytesConfig(load_in_4bit=True)
    (NF4, double quant, compute dtype `dtype`) onto `device`, via a temporary folder."""
    import tempfile

    from transformers import BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    from lorakern.bench.qlora import import_bitsandbytes

    import_bitsandbytes()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QLORA_FORMAT["quant_type"],
                                bnb_4bit_use_double_quant=QLORA_FORMAT["double_quant"], bnb_4bit_compute_dtype=dtype)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="lorakern-e2e-") as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(folder)
            target = device.index if device.index is not None else "cpu"
            if device.type == "cuda" and device.index is None:
                target = torch.cuda.current_device()
            return type(model).from_pretrained(folder, quantization_config=config, device_map={"": target}, dtype=dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def run_e2e_qlora(
    device: torch.device,
    dtype: torch.dtype,
    size: E2ESize,
    providers: list[str],
    tick: Callable[[str], None] = lambda label: None,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    seed: int = 0,
) -> list[dict]:
    """One row per provider ("lorakern-qlora", "peft-qlora"): the same training step as
    `run_e2e` over a 4-bit base (see the module docstring), from the same dense weights and
    the same A (B = 0), on the same batch."""
    base = build_llama(size, device, dtype, seed)
    models: dict[str, nn.Module] = {}
    if "peft-qlora" in providers:
        models["peft-qlora"] = inject_peft(load_bnb_4bit(base, device, dtype), r, alpha, dropout)
    if "lorakern-qlora" in providers:
        models["lorakern-qlora"] = inject_lorakern(quantize_lorakern(base, dtype), r, alpha, dropout)
    del base
    if len(models) == 2:
        copy_adapters(models["peft-qlora"], models["lorakern-qlora"])
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    ids = torch.randint(0, size.vocab_size, (size.batch, size.seq_len), generator=gen).to(device)
    rows = []
    for name in list(models):
        model = models.pop(name)
        params = logical_params(model)  # before training: bitsandbytes may repack on CPU only in eval
        row = train_steps(name, model, ids, size, device, tick).as_dict()
        row["params"] = params
        rows.append(row)
        del model
        if device.type == "cuda":  # free before the next one runs
            torch.cuda.empty_cache()
    return rows


def steps_count(size: E2ESize, providers: list[str], compile: bool = False) -> int:
    return (2 if compile else 1) * len(providers) * (size.warmup_steps + size.steps)


def run_e2e(
    device: torch.device,
    dtype: torch.dtype,
    size: E2ESize,
    providers: list[str],
    tick: Callable[[str], None] = lambda label: None,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    seed: int = 0,
    compile: bool = False,
) -> list[dict]:
    """One row per provider ("lorakern", "peft"): tokens/s, step times, peak and saved
    memory; with `compile`, then one more per provider under torch.compile
    ("lorakern+compile", "peft+compile"), each from the same starting weights."""
    rows = []
    for compiled in (False, True) if compile else (False,):
        base = build_llama(size, device, dtype, seed)
        models: dict[str, nn.Module] = {}
        if "peft" in providers:
            models["peft"] = inject_peft(copy.deepcopy(base), r, alpha, dropout)
        if "lorakern" in providers:
            models["lorakern"] = inject_lorakern(base, r, alpha, dropout)
        del base
        if len(models) == 2:
            copy_adapters(models["peft"], models["lorakern"])
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        ids = torch.randint(0, size.vocab_size, (size.batch, size.seq_len), generator=gen).to(device)
        for name in list(models):
            label = f"{name}+compile" if compiled else name
            rows.append(train_steps(label, models.pop(name), ids, size, device, tick, compile=compiled).as_dict())
            if device.type == "cuda":  # free before the next one runs
                torch.cuda.empty_cache()
        if compiled:
            torch._dynamo.reset()
    return rows
