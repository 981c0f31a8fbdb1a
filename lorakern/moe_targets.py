"""PEFT's rewrite of LoRA targets for transformers 5 mixture-of-experts models.

transformers 5 stores a MoE layer's experts as fused 3-D parameters (Mixtral's w1 / w3 / w2
per expert became ``experts.gate_up_proj`` / ``experts.down_proj``; Qwen2-MoE-style models'
gate_proj / up_proj / down_proj likewise) and its router as a custom module with a
``weight``. PEFT (0.19+, with transformers 5) rewrites a LoRA config so that the old names
still target them: before injecting, `target_modules` entries naming the old projections
move to `target_parameters`, and the two fused projections (w1 + w3, or gate_proj +
up_proj) get rank and alpha doubled through rank_pattern / alpha_pattern, so each branch
keeps alpha / r. "all-linear" resolves to the nn.Linear layers' leaf names plus all the old
names, so on Mixtral it also targets the experts and the router.

`convert_moe_config` does the same, returning a new config (the argument is unchanged). It
applies only to the model types PEFT rewrites: those transformers' conversion table maps to
the "mixtral" or "qwen2_moe" patterns, plus "mixtral" itself (PEFT adds it), and only with
transformers 5. A config without the old names comes back equal.

`convert_v4_tensors` rewrites an adapter file saved with transformers 4 (per-expert
``experts.3.w1.lora_A.weight`` keys) into those parameters' layout, as PEFT does on load.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import nn

from lorakern.config import ALL_LINEAR, LoraConfig

# old projection name -> the transformers 5 parameter it lives in, per conversion pattern
TARGET_MAPPING: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"},
}
# fused parameter -> the old names fused into it (all or none must be targeted)
FUSED: dict[str, dict[str, list[str]]] = {
    "mixtral": {"gate_up_proj": ["w1", "w3"]},
    "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]},
}


def conversion_pattern(model: nn.Module) -> str | None:
    """"mixtral" / "qwen2_moe" when PEFT rewrites this model's LoRA targets, else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return None
    try:
        import transformers
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4 (or none): the experts are still nn.Linear modules
        return None
    if int(transformers.__version__.split(".")[0]) < 5 or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    patterns = dict(_MODEL_TO_CONVERSION_PATTERN, mixtral="mixtral")
    pattern = patterns.get(model_type)
    return pattern if pattern in TARGET_MAPPING else None


def convert_moe_config(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """`config` with PEFT's transformers-5 MoE rewrite applied for `model` (see the module
    docstring); `config` itself when nothing applies. Raises ValueError when only some of
    the projections fused into one parameter are targeted (PEFT's error)."""
    pattern = conversion_pattern(model)
    if pattern is None or config.target_modules is None:
        return config
    mapping, fused = TARGET_MAPPING[pattern], FUSED[pattern]
    targets = config.target_modules
    if isinstance(targets, str):
        targets = _resolve_string(config, model, mapping)
        if not targets:
            return config  # nothing matched: the usual "matched no module" error follows
    params = set(config.target_parameters or [])
    remaining: list[str] = []
    present: dict[str, set[str]] = {new: set() for new in fused}
    for target in targets:
        old = next((o for o in mapping if target == o or target.endswith("." + o)), None)
        if old is None:
            remaining.append(target)
            continue
        params.add(mapping[old])
        if mapping[old] in fused:
            present[mapping[old]].add(old)
    if not params - set(config.target_parameters or []) and isinstance(config.target_modules, list):
        return config
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new, olds in fused.items():
        got = present[new]
        if 0 < len(got) < len(olds):
            raise ValueError(
                f"cannot target {sorted(got)} without also targeting {sorted(set(olds) - got)}: in transformers 5 "
                f"they are fused into {new!r} (as PEFT refuses)"
            )
        if len(got) == len(olds) > 1:  # each fused branch keeps its alpha / r
            key = rf".*\.{re.escape(new)}"
            rank_pattern[key] = config.r * len(olds)
            alpha_pattern[key] = config.lora_alpha * len(olds)
    return replace(
        config, target_modules=sorted(set(remaining)), target_parameters=sorted(params),
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
    )


def _resolve_string(config: LoraConfig, model: nn.Module, mapping: dict[str, str]) -> set[str]:
    """A regex or "all-linear" target_modules as the leaf names it targets (PEFT's rule):
    "all-linear" is the nn.Linear layers' leaf names (output head excluded) plus every old
    projection name; a regex is the leaf names of the module and parameter keys it matches,
    plus each old name whose reconstructed key (the fused parameter's module + old name)
    it matches."""
    from lorakern.model import resolve_targets  # the all-linear rule (imports this module lazily)

    if config.target_modules.lower() == ALL_LINEAR:
        return {name.rsplit(".", 1)[-1] for name in resolve_targets(model, config)} | set(mapping)
    keys = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    matched = {k.rsplit(".", 1)[-1] for k in keys if k and config.matches(k)}
    containers: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in mapping.items():
        if old not in matched and any(config.matches(f"{c}.{old}") for c in containers.get(new, ())):
            matched.add(old)
    return matched


# Module names transformers 5 renamed in these models (the v4 name -> the v5 one).
RENAMED_MODULES: dict[str, dict[str, str]] = {"mixtral": {"block_sparse_moe": "mlp"}, "qwen2_moe": {}}
_V4_EXPERT_KEY = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<old>[^.]+)\.lora_(?P<ab>[AB])\.weight$")


def convert_v4_tensors(model: nn.Module, targets: list, tensors: dict, prefix: str) -> dict:
    """An adapter file's tensors saved with transformers 4 (one LoRA per expert and
    projection: ``…experts.3.w1.lora_A.weight``) as LoRA on the transformers 5 parameters,
    as PEFT converts them on load: per expert, the projections fused into one parameter
    (w1 and w3 into gate_up_proj) stack their A's ([A_w1; A_w3], rank 2r) and put their
    B's on a block diagonal; the experts go into LoraParameter's layout (A rows
    expert-major, B columns rank-major); renamed modules (Mixtral's block_sparse_moe, now
    mlp) take their new names. `targets`: the planned Targets (the config already rewritten
    by `convert_moe_config`). Tensors it does not recognise are returned unchanged."""
    pattern = conversion_pattern(model)
    if pattern is None:
        return tensors
    renames = RENAMED_MODULES[pattern]

    def renamed(key: str) -> str:
        for old, new in renames.items():
            key = key.replace(f".{old}.", f".{new}.")
        return key

    out: dict = {}
    experts: dict[tuple[str, str], dict[int, dict[str, object]]] = {}
    originals: dict[tuple[str, str], list[tuple[str, object]]] = {}
    for key, value in tensors.items():
        new_key = renamed(key)
        m = _V4_EXPERT_KEY.match(new_key)
        if m is None or m["old"] not in TARGET_MAPPING[pattern]:
            out[new_key] = value
            continue
        group = (m["experts"], m["old"])
        experts.setdefault(group, {}).setdefault(int(m["e"]), {})[m["ab"]] = value
        originals.setdefault(group, []).append((key, value))
    if not experts:
        return tensors if out.keys() == tensors.keys() else out
    for t in targets:
        if t.parameter is None or t.parameter not in TARGET_MAPPING[pattern].values():
            continue
        olds = FUSED[pattern].get(t.parameter) or [o for o, new in TARGET_MAPPING[pattern].items() if new == t.parameter]
        owner = prefix + t.owner
        parts = [experts.get((owner, o)) for o in olds]
        n = getattr(getattr(t.module, "get_param", lambda: None)(), "shape", None)
        count = n[0] if n is not None else getattr(t.module, t.parameter).shape[0]
        if any(p is None or sorted(p) != list(range(count)) or any(len(p[e]) != 2 for e in p) for p in parts):
            continue  # incomplete: left as the file has it (the load then names the keys)
        A = torch.stack([torch.cat([p[e]["A"] for p in parts]) for e in range(count)])  # [E, R, in]
        B = torch.stack([torch.block_diag(*[p[e]["B"] for p in parts]) for e in range(count)])  # [E, out, R]
        out[f"{prefix}{t.name}.lora_A.weight"] = A.reshape(-1, A.shape[-1])
        out[f"{prefix}{t.name}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], -1)
        for o in olds:
            del experts[(owner, o)]
    for group in experts:  # not converted: back under the file's own names
        out.update(originals[group])
    return out
