"""LoraConfig and PEFT's target-matching rules.

Field names, defaults and matching follow PEFT's LoRA config, so a config (and an
``adapter_config.json``) moves between the two libraries unchanged:

- ``target_modules`` as a list: a module matches when its dotted name equals an entry
  or ends with ``"." + entry`` (so ``"proj"`` does not match ``q_proj``);
  as a str: a regex that must ``re.fullmatch`` the whole dotted name;
  ``"all-linear"``: every nn.Linear / transformers Conv1D except the output head.
- ``exclude_modules`` (same list / str rules) is checked first; modules named in
  ``modules_to_save`` (as whole dotted components) are never LoRA targets. Wrapping
  uses a looser rule (plain ``endswith``, see ``module_to_save``), so ``"proj"`` still
  wraps ``q_proj``: ``inject`` raises for such a module rather than lose its LoRA.
- ``layers_to_transform`` / ``layers_pattern`` keep list-matched modules whose layer
  index (the first ``<pattern>.<digits>.`` in the name) is selected.
- ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` (in insertion order) with
  ``re.match(rf"(.*\\.)?({k})$", name)`` gives the module's r / lora_alpha.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

BIAS_OPTIONS = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"

# PEFT's default targets for a few common architectures (used when target_modules is
# None), keyed by transformers' `config.model_type`. Copied from PEFT's
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING rather than imported, because PEFT
# is optional; tests/test_model.py checks every entry against the installed PEFT.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
}

# Keys PEFT writes into adapter_config.json for LoRA that lorakern reads and ignores
# when they hold these (PEFT's default, feature-off) values. Any other value means a
# feature lorakern does not implement: loading such a config raises instead of
# silently computing something else.
PEFT_FEATURE_OFF: dict[str, Any] = {
    "layer_replication": None,
    "loftq_config": {},
    "megatron_config": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "ensure_weight_tying": False,
}
# Keys PEFT writes that carry no math (bookkeeping); read and ignored silently.
PEFT_BOOKKEEPING = (
    "peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
    "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "corda_config",
    "eva_config", "lora_ga_config", "kasa_config", "monteclora_config", "velora_config",
)


@dataclass
class LoraConfig:
    """LoRA settings, with PEFT's field names and defaults.

    Args:
        r: default rank (>= 1).
        lora_alpha: default scale numerator (scaling = lora_alpha / r, or / sqrt(r) with use_rslora).
        lora_dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: list of names (suffix match), a regex str (fullmatch), "all-linear", or None
            (PEFT's default for known transformers architectures).
        exclude_modules: list or regex str of modules never to target.
        bias: "none" | "all" (every parameter named "bias" or "<...>.bias" is trained and saved)
            | "lora_only" (biases of the LoRA-wrapped layers).
        use_rslora: scaling = lora_alpha / sqrt(r).
        modules_to_save: names (suffix match) of modules trained in full and saved with the adapter.
        init_lora_weights: True | "gaussian" | False (see LoraLinear).
        layers_to_transform: layer index or list of indices to target (list targets only).
        layers_pattern: name(s) of the layer container (e.g. "layers", "h").
        rank_pattern / alpha_pattern: {regex: r} / {regex: alpha} overrides per module.
        fan_in_fan_out: the targeted base weights are stored [in, out] (GPT-2's Conv1D).
        use_dora: DoRA (weight-decomposed LoRA), PEFT's semantics (lorakern/dora.py).
        lora_bias: lora_B gets a bias b (PEFT's lora_bias): the adapter adds s·b to the output;
            zero-initialised (random with init_lora_weights=False), merged into the base bias.
            As in PEFT, not with use_dora nor init_lora_weights="gaussian".
        target_parameters: names of parameters (suffix match on "<module>.<parameter>", e.g.
            "experts.gate_up_proj", "gate.weight") to put LoRA on directly: a mixture of
            experts' 3-D weights get one delta per expert (lorakern/parameter.py, PEFT's
            semantics). With target_modules None, only these are targeted. Not with
            lora_dropout, use_dora, lora_bias or fan_in_fan_out (as in PEFT).
        trainable_token_indices: token ids whose embedding rows are trained (PEFT's semantics,
            lorakern/trainable_tokens.py): a list (the input embedding) or {module name: ids}
            (suffix match). Ids are ints >= 0, distinct, at least one per module.

    Example:
        >>> import lorakern
        >>> cfg = lorakern.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        >>> cfg.scaling_for("model.layers.0.self_attn.q_proj")
        2.0
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be an int >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or not math.isfinite(self.lora_alpha):
            raise ValueError(f"LoraConfig: lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or isinstance(self.lora_dropout, bool) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for name in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
            # A JSON string "false" is truthy: it would switch the feature on silently.
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LoraConfig: {name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.bias, str) or self.bias not in BIAS_OPTIONS:
            raise ValueError(f"LoraConfig: bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        if not (self.init_lora_weights is True or self.init_lora_weights is False or self.init_lora_weights == "gaussian"):
            raise ValueError(f"LoraConfig: init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if self.lora_bias:  # PEFT's LoraConfig refuses the same combinations
            if self.init_lora_weights not in (True, False):
                raise ValueError(
                    f"LoraConfig: lora_bias=True needs init_lora_weights True or False, got {self.init_lora_weights!r}"
                )
            if self.use_dora:
                raise ValueError("LoraConfig: lora_bias=True is not supported with use_dora=True (as in PEFT)")
        tp = self.target_parameters
        if tp is not None:
            if isinstance(tp, str) or not isinstance(tp, (list, tuple, set, frozenset)) or not all(isinstance(t, str) and t for t in tp):
                raise TypeError(f"LoraConfig: target_parameters must be a list of parameter names, got {tp!r}")
            self.target_parameters = sorted(set(tp))
        self.trainable_token_indices = _token_indices(self.trainable_token_indices)
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not isinstance(self.modules_to_save, (list, tuple, set, frozenset)) \
                    or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"LoraConfig: modules_to_save must be a list of str, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
            for m in self.modules_to_save:  # each entry is spliced into a regex by is_excluded
                _check_regex("modules_to_save", rf"(^|.*\.){m}($|\..*)", shown=m)
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None:
                raise ValueError("LoraConfig: layers_to_transform cannot be used when target_modules is a str (regex or 'all-linear')")
            if self.layers_pattern is not None:
                raise ValueError("LoraConfig: layers_pattern cannot be used when target_modules is a str (regex or 'all-linear')")
        # PEFT's exact check (peft/tuners/lora/config.py): only None is refused. An empty
        # layers_to_transform is accepted and, as in PEFT's matching, selects every layer.
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig: layers_pattern needs layers_to_transform to be set too")
        lt = self.layers_to_transform
        if lt is not None:
            items = [lt] if isinstance(lt, int) else lt
            if isinstance(lt, bool) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                raise TypeError(f"LoraConfig: layers_to_transform must be an int >= 0 or a list of them, got {lt!r}")
            if not isinstance(lt, int):
                self.layers_to_transform = list(lt)
        if self.layers_pattern is not None:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
                raise TypeError(f"LoraConfig: layers_pattern must be a str or a list of str, got {self.layers_pattern!r}")
            for pattern in patterns:  # spliced into a regex by _layer_selected
                _check_regex("layers_pattern", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", shown=pattern)
            if not isinstance(self.layers_pattern, str):
                self.layers_pattern = list(self.layers_pattern)
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"LoraConfig: {name} must be a dict {{regex: value}}, got {value!r}")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for key, value in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}] must be an int >= 1, got {value!r}")
        for key, value in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"LoraConfig: alpha_pattern[{key!r}] must be a finite number, got {value!r}")

    # ---- per-module values -------------------------------------------------------

    def rank_for(self, name: str) -> int:
        """r for the module with dotted name `name` (rank_pattern first, then r)."""
        key = _pattern_key(self.rank_pattern, name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        """lora_alpha for the module with dotted name `name` (alpha_pattern first, then lora_alpha)."""
        key = _pattern_key(self.alpha_pattern, name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, name: str) -> float:
        """alpha / r (alpha / sqrt(r) with use_rslora) for module `name`."""
        r = self.rank_for(name)
        return self.alpha_for(name) / (math.sqrt(r) if self.use_rslora else r)

    # ---- matching ----------------------------------------------------------------

    def is_excluded(self, name: str) -> bool:
        """True when `name` is excluded (exclude_modules) or is a modules_to_save module."""
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, name):
                    return True
            elif _suffix_match(ex, name):
                return True
        if self.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in self.modules_to_save):
            return True
        return False

    def matches(self, name: str, targets: list[str] | str | None = None) -> bool:
        """PEFT's rule: does module `name` get a LoRA adapter? `targets` overrides target_modules
        (used after "all-linear" is resolved to a list of full names)."""
        if self.is_excluded(name):
            return False
        targets = self.target_modules if targets is None else targets
        if targets is None:
            return False
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        if name in targets:
            return True  # an exact full name is taken as is (no layer filter), as in PEFT
        if not any(name.endswith("." + t) for t in targets):
            return False
        return self._layer_selected(name)

    def _layer_selected(self, name: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or (isinstance(wanted, list) and not wanted):
            return True
        patterns = self.layers_pattern
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            match = None
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == wanted if isinstance(wanted, int) else idx in wanted

    def module_to_save(self, name: str) -> bool:
        """PEFT's modules_to_save rule: the dotted name ends with one of the entries.

        Plain endswith (as PEFT's _set_trainable), so "proj" matches "q_proj" although
        `is_excluded` does not exclude q_proj from targeting; `inject` refuses that overlap.
        """
        return bool(self.modules_to_save) and any(name.endswith(m) for m in self.modules_to_save)

    # ---- PEFT's adapter_config.json ---------------------------------------------

    def to_peft_dict(self) -> dict[str, Any]:
        """The dict PEFT writes as adapter_config.json for this config (feature-off keys included)."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        if isinstance(d["exclude_modules"], list):
            d["exclude_modules"] = sorted(d["exclude_modules"])
        if d["target_parameters"] is not None:
            d["target_parameters"] = sorted(d["target_parameters"])
        d.update(PEFT_FEATURE_OFF)  # lora_bias is a field: written above
        d.update(
            peft_type="LORA", task_type=None, inference_mode=True, base_model_name_or_path=None,
            revision=None, auto_mapping=None,
        )
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        """Build a config from an adapter_config.json dict.

        Raises ValueError for another peft_type or a LoRA feature lorakern does not
        implement (e.g. layer_replication); unknown keys are ignored with a warning.
        """
        if not isinstance(d, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"adapter config is for peft_type {peft_type!r}; lorakern reads only 'LORA'")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in d.items():
            if key in own:
                kwargs[key] = value
            elif key in PEFT_FEATURE_OFF:
                off = PEFT_FEATURE_OFF[key]
                if value != off and not (off == {} and value in (None, {})) and not (off is None and value in ({}, [])):
                    raise ValueError(
                        f"adapter config sets {key}={value!r}, a PEFT LoRA feature lorakern does not implement"
                    )
            elif key not in PEFT_BOOKKEEPING:
                unknown.append(key)
        if unknown:
            warnings.warn(f"adapter config: ignoring unknown keys {sorted(unknown)}", stacklevel=2)
        return cls(**kwargs)


def _token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """trainable_token_indices checked and copied: None, a list of ids, or {module name: ids}."""
    if value is None:
        return None

    def ids(where: str, v: Any) -> list[int]:
        if isinstance(v, (str, bytes, dict)) or not isinstance(v, (list, tuple)) \
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            raise TypeError(f"LoraConfig: trainable_token_indices{where} must be a list of token ids (ints >= 0), got {v!r}")
        if not v:
            raise ValueError(f"LoraConfig: trainable_token_indices{where} is empty; give at least one token id (or None)")
        seen: set[int] = set()
        dup = sorted({i for i in v if i in seen or seen.add(i)})
        if dup:
            raise ValueError(f"LoraConfig: trainable_token_indices{where} repeats ids {dup[:8]}; each id may appear once")
        return list(v)

    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise TypeError(f"LoraConfig: trainable_token_indices as a dict maps module names to ids, got {value!r}")
        return {k: ids(f"[{k!r}]", v) for k, v in value.items()}
    return ids("", value)


def _names_or_regex(what: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value.lower() != ALL_LINEAR:
            _check_regex(what, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"LoraConfig: {what} must be a list of str, a regex str or None, got {value!r}")


def _check_regex(what: str, pattern: str, shown: str | None = None) -> None:
    """ValueError naming `what` and the user's entry (`shown`, default `pattern`) when
    `pattern` does not compile."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"LoraConfig: {what} {shown if shown is not None else pattern!r} is not a valid regex: {exc}") from None


def _suffix_match(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith("." + n) for n in names)


def _pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None
