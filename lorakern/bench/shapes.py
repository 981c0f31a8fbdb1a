"""Shape presets: (K, N) projections and token counts M.

Headline shapes (DESIGN.md §6) are the Llama-3-8B projections: (K, N) = (4096, 4096)
q/o, (4096, 1024) k/v, (4096, 14336) gate/up, (14336, 4096) down.
"""

from __future__ import annotations

from dataclasses import dataclass

DECODE_MAX_M = 16


@dataclass(frozen=True)
class Preset:
    """A named set of projections and token counts (ranks come from --rank)."""

    name: str
    kn: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    ranks: tuple[int, ...] = (16,)
    description: str = ""


LLAMA8B_KN = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
LLAMA70B_KN = ((8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192))

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny", ((64, 64), (64, 96)), (4, 48), (4,),
        "seconds-long smoke run (tests, CI)",
    ),
    "small": Preset(
        "small", ((512, 512), (512, 128), (512, 1792), (1792, 512)), (1, 16, 64, 256, 1024), (16,),
        "Llama-3-8B projections scaled down 8x, the CPU default",
    ),
    "llama8b": Preset(
        "llama8b", LLAMA8B_KN, (1, 16, 512, 2048, 8192, 16384), (16,),
        "Llama-3-8B projections at decode and training token counts, the GPU default",
    ),
    "mixed": Preset(
        "mixed", ((4096, 4096), (4096, 14336)), (16, 64, 256, 2048), (16,),
        "mixed batches (--suite mixed): Llama-3-8B q_proj and gate/up_proj, decode batches M = 16-256 and "
        "a prefill M = 2048, the GPU default",
    ),
    "mixed-small": Preset(
        "mixed-small", ((512, 512), (512, 1792)), (16, 64, 256, 1024), (16,),
        "mixed batches (--suite mixed): the mixed preset's projections scaled down 8x, prefill M = 1024, "
        "the CPU default",
    ),
    "moe": Preset(
        "moe", ((4096, 14336),), (16, 256, 2048), (16,),
        "LoRA on expert parameters (--suite moe): one Mixtral-8x7B experts block (hidden 4096 x intermediate "
        "14336, 8 experts, top-2), the GPU default",
    ),
    "moe-small": Preset(
        "moe-small", ((256, 512),), (64, 512), (16,),
        "LoRA on expert parameters (--suite moe): hidden 256 x intermediate 512, 8 experts, top-2, the CPU default",
    ),
    "all": Preset(
        "all", LLAMA8B_KN + LLAMA70B_KN, (1, 16, 512, 2048, 8192, 16384), (8, 16, 64),
        "Llama-3-8B and -70B projections, ranks 8/16/64",
    ),
}


def parse_kn(text: str) -> tuple[int, int]:
    """'4096x1024' -> (4096, 1024) = (K in_features, N out_features)."""
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must be KxN (in x out features), e.g. 4096x1024, got {text!r}") from None
    if k < 1 or n < 1:
        raise ValueError(f"shape dims must be >= 1, got {text!r}")
    return k, n


def modes_for(M: int, modes: tuple[str, ...]) -> list[str]:
    """decode runs at M <= 16 only; fwd and fwd+bwd at M > 16 only."""
    if M <= DECODE_MAX_M:
        return [m for m in modes if m == "decode"]
    return [m for m in modes if m != "decode"]
