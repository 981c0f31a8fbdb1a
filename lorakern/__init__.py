"""lorakern: fused Triton LoRA layers for PyTorch, with a pure-PyTorch reference path."""

from lorakern.adapters import load_adapter, save_adapter
from lorakern.config import LoraConfig
from lorakern.conv import LoraConv, LoraConv2d
from lorakern.embedding import LoraEmbedding
from lorakern.layer import LoraLinear
from lorakern.model import (
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    inject,
    merge,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    trainable_parameters_summary,
    unload,
    unmerge,
)
from lorakern.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from lorakern.mixed import lora_linear_mixed, mixed_batch
from lorakern.ops import lora_linear
from lorakern.peft_compat import patch_peft, unpatch_peft
from lorakern.qops import lora_linear_quantized
from lorakern.quantized import QuantLinear, quantize

__version__ = "0.1.0"


def __getattr__(name: str):
    """`lorakern.hf` (Hugging Face Trainer integration) is imported on first use."""
    if name == "hf":
        import importlib

        return importlib.import_module("lorakern.hf")
    raise AttributeError(f"module 'lorakern' has no attribute {name!r}")

__all__ = [
    "LoraLinear", "LoraEmbedding", "LoraConv", "LoraConv2d", "lora_linear", "__version__",
    "LoraConfig", "inject", "set_adapter", "delete_adapter", "disable_adapters", "add_weighted_adapter",
    "merge", "unmerge", "unload", "trainable_parameters", "trainable_parameters_summary",
    "print_trainable_parameters", "save_adapter", "load_adapter", "patch_peft", "unpatch_peft",
    "quantize", "QuantLinear", "lora_linear_quantized", "lora_linear_mixed", "mixed_batch",
    "hotswap_adapter", "prepare_model_for_compiled_hotswap",
]
