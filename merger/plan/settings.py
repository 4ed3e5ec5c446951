"""Architecture settings that change what a model computes, compared across a merge's inputs.

The output's `config.json` is the config donor's (the base model, else the first model), so every
setting of the donor reaches the output. What can go wrong is another input: trained with another
value (the plan warns, naming the value kept and why), with a setting the donor's class does not
have at all (refused: the output could not compute it), or of another model family whose
computation differs in ways no setting states (refused). Values are compared as transformers reads
them (class defaults filled in, old `rope_scaling` and new `rope_parameters` spellings unified), so a
config saved by another transformers version is not a difference. See docs/decisions.md,
"Architecture settings".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from merger.errors import ArchitectureSettingError, raise_problems

# Config attributes that change the forward pass (grouped as in the issue: position encoding, sliding
# window, biases, norms, activation, head counts, scales). `layer_types` is not here: the planner takes
# it per output layer from each layer's origin.
SETTINGS = (
    "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "rotary_pct", "rotary_emb_base",
    "rope_local_base_freq", "position_embedding_type", "max_position_embeddings",
    "sliding_window", "use_sliding_window", "max_window_layers", "sliding_window_pattern", "attention_chunk_size",
    "attention_bias", "mlp_bias", "use_qkv_bias", "qkv_bias", "bias", "use_bias",
    "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "qk_layernorm", "use_qk_norm",
    "hidden_act", "hidden_activation", "activation_function",
    "num_attention_heads", "num_key_value_heads", "head_dim", "n_head", "num_kv_heads", "multi_query",
    "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "logit_scale",
    "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
    "use_parallel_residual", "parallel_attn",
)
# Families whose layers compute the same function given equal settings (Mistral is Llama with an
# optional sliding window, which is compared as a setting).
SAME_COMPUTATION = ({"llama", "mistral"},)
_MISSING = object()
# config.json keys that record how a config was saved, never what the model computes
_PROVENANCE = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"})
# transformers' config classes build per-layer lists (`layer_types`) from the layer count: a hostile
# config.json stating billions of layers must not reach them (no real decoder has this many).
MAX_LAYERS = 4096


@dataclass(frozen=True)
class SettingsCheck:
    """What comparing the inputs' settings found.

    Attributes:
        warnings: one per setting the inputs disagree on, naming each value and the one kept.
        refusals: one per setting that cannot reach the output, and one per family mismatch.
    """

    warnings: tuple[str, ...]
    refusals: tuple[str, ...]


def effective_text_config(config: dict) -> Any:
    """The text decoder's config as transformers reads it (defaults filled in), or the raw dict.

    Args:
        config: a parsed `config.json` (a multimodal one's text part is its `text_config`).

    Returns:
        A transformers config object, or the (text part of the) dict when transformers does not
        know the `model_type` or rejects the values.
    """
    from transformers import AutoConfig

    sections = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    if any(isinstance(v, int) and v > MAX_LAYERS for part in sections for k, v in part.items() if "layers" in k):
        return sections[-1]  # implausible layer count: compare the raw keys, build nothing
    try:
        fields = {key: value for key, value in config.items() if key != "model_type"}
        return AutoConfig.for_model(config["model_type"], **fields).get_text_config()
    except Exception:  # unknown or custom model_type, or values the class rejects: compare the raw keys
        text = config.get("text_config")
        return text if isinstance(text, dict) else config


def _value(config: Any, name: str) -> Any:
    if name in ("rope_scaling", "rope_theta") and _get(config, "rope_parameters") is not _MISSING:
        return _MISSING  # transformers 5 folds both into `rope_parameters`, compared already
    return _get(config, name)


def _get(config: Any, name: str) -> Any:
    return config.get(name, _MISSING) if isinstance(config, dict) else getattr(config, name, _MISSING)


def _family(config: Any, raw: dict) -> str:
    return str(_get(config, "model_type") if _get(config, "model_type") is not _MISSING else raw.get("model_type"))


def compare_settings(configs: dict[str, dict], donor: str) -> SettingsCheck:
    """Compare every input's computation-changing settings with the config donor's.

    Args:
        configs: model reference -> its parsed `config.json`, in config order.
        donor: the reference whose config the output takes.

    Returns:
        The :class:`SettingsCheck`: disagreements as warnings (the donor's value is kept), settings
        the donor's class lacks but another input sets (not None/False) and family mismatches as refusals.
    """
    if _alike(configs.values()):  # one class reading the same values: every setting agrees
        return SettingsCheck((), ())
    effective = {ref: effective_text_config(config) for ref, config in configs.items()}

    warnings, refusals = [], []
    families = {ref: _family(cfg, configs[ref]) for ref, cfg in effective.items()}
    for ref, family in families.items():
        if family != families[donor] and not any({family, families[donor]} <= group for group in SAME_COMPUTATION):
            refusals.append(
                f"`{ref}` is a `{family}` model and the output takes the base `{donor}`'s `{families[donor]}` "
                "architecture; their layers compute differently, so merge models of one family (or make the "
                "base one of the same family as the others)"
            )
    for name in SETTINGS:
        values = {ref: _value(cfg, name) for ref, cfg in effective.items()}
        if len({repr(_off(v)) for v in values.values()}) <= 1:
            continue
        if values[donor] is _MISSING:
            for ref, value in values.items():
                if _off(value) is not None:
                    refusals.append(
                        f"`{ref}` sets `{name}: {_short(value)}`, but the output's config (from `{donor}`, "
                        f"{families[donor]}) has no `{name}`, so the output would compute without it; make "
                        f"`{ref}` the base model, or leave it out"
                    )
            continue
        listing = ", ".join(f"`{ref}` {_short(v)}" for ref, v in values.items() if v is not _MISSING)
        warnings.append(
            f"`{name}` differs between the models ({listing}); the output keeps {_short(values[donor])} from "
            f"`{donor}`, whose config.json it takes (the base model, else the first model)"
        )
    return SettingsCheck(tuple(warnings), tuple(refusals))


def _alike(configs) -> bool:
    """Whether the configs are equal but for their provenance keys. Then their settings are equal as
    transformers reads them too, so they need not be built: loading transformers' config registry
    costs about a second per merge (measured: 0.9-1.0 s of a 3.7 s linear merge of the half set)."""
    stripped = [{key: value for key, value in config.items() if key not in _PROVENANCE} for config in configs]
    return all(config == stripped[0] for config in stripped[1:])


# Sliding-window keys mean different things per class (Qwen2's `use_sliding_window` + `max_window_layers`,
# Mistral's bare `sliding_window`); the attention pattern they produce is compared instead.
_WINDOW_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "sliding_window_pattern")


def attention_pattern(config: Any) -> tuple[tuple[str, ...], Any]:
    """Which layers attend through a sliding window, and its width, as a config's class computes it.

    Args:
        config: an effective config (:func:`effective_text_config`).

    Returns:
        (`layer_types`, window): the per-layer types (classes without them, like Mistral, Mixtral and
        Qwen3-MoE, window every layer when `sliding_window` is set) and the width, None when no layer
        slides.
    """
    window, types = _get(config, "sliding_window"), _get(config, "layer_types")
    if not isinstance(types, (list, tuple)):
        on = window not in (_MISSING, None, 0)
        types = ["sliding_attention" if on else "full_attention"] * int(_get(config, "num_hidden_layers") or 0)
    sliding = "sliding_attention" in types
    return tuple(types), (window if sliding else None)


def _differences(base: Any, output: Any) -> list[tuple[str, Any, Any]]:
    """(name, base value, output value) of each setting the base states that the output reads otherwise."""
    found = []
    for name in SETTINGS:
        base_value, out_value = _resolved(base, name), _resolved(output, name)
        if name in _WINDOW_KEYS or base_value is _MISSING or repr(_off(base_value)) == repr(_off(out_value)):
            continue
        found.append((name, base_value, out_value))
    return found


def state_class_defaults(base_config: dict, output_config: dict) -> dict:
    """Settings the base's config.json leaves to its class's default, where the output's class has another.

    A Mistral config.json without `rope_theta` means 10000; a Mixtral one means 1e6: the output must
    state the base's value. Only settings absent from the base's file are filled in (a stated one is
    copied already).

    Args:
        base_config: the base's parsed `config.json`.
        output_config: the output's `config.json` so far.

    Returns:
        `output_config` with those settings stated (plus `rope_theta` beside a filled-in
        `rope_parameters`, for readers that know only the old key); the same dict when none is missing.
    """
    base, output = effective_text_config(base_config), effective_text_config(output_config)
    filled = dict(output_config)
    for name, value, _ in _differences(base, output):
        if name in base_config or not isinstance(value, (int, float, str, dict, list)):
            continue
        filled[name] = value
        if name == "rope_parameters" and isinstance(value.get("rope_theta"), (int, float)):
            filled.setdefault("rope_theta", value["rope_theta"])
    return filled


def output_refusals(base_config: dict, output_config: dict) -> tuple[str, ...]:
    """What an output of another class (an MoE built around a dense base) would compute differently.

    Both configs are read as transformers reads them; every setting the base states (not None/False)
    must read the same in the output, and the layers must slide over the same window.

    Args:
        base_config: the dense base's parsed `config.json`.
        output_config: the output's `config.json` (built from the base's).

    Returns:
        One refusal per setting the output would lose or change, naming it and both values.
    """
    base, output = effective_text_config(base_config), effective_text_config(output_config)
    refusals = []
    if attention_pattern(base) != attention_pattern(output):
        (base_types, base_window), (out_types, out_window) = attention_pattern(base), attention_pattern(output)
        refusals.append(
            f"the base slides a window of {base_window} over {base_types.count('sliding_attention')} of its "
            f"{len(base_types)} layers (`sliding_window`), the `{_family(output, output_config)}` output would "
            f"slide {out_window} over {out_types.count('sliding_attention')}; its config cannot state the "
            "base's sliding window. Pick an output that can (`architecture: mixtral` for a Mistral base)"
        )
    for name, base_value, out_value in _differences(base, output):
        held = "has no such setting" if out_value is _MISSING else f"reads it as {_short(out_value)}"
        refusals.append(f"the base sets `{name}: {_short(base_value)}` and the `{_family(output, output_config)}` "
                        f"output {held}, so it would compute differently; pick another `architecture:`")
    return tuple(refusals)


def _resolved(config: Any, name: str) -> Any:
    """A setting's value, with `head_dim` left unset (None or absent) read as the classes compute it."""
    value = _value(config, name)
    if name == "head_dim" and value in (None, _MISSING):
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            return hidden // heads
    return value


def _off(value: Any) -> Any:
    """None for a setting that is absent, None or False (all mean "off"); else the value."""
    return None if value is _MISSING or value is None or value is False else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class ClassSettings:
    """An output config's step through transformers' config classes, left on the plan to run later.

    An output of another class than its base (an MoE around a dense base) must state the base's
    settings its class leaves to defaults (:func:`state_class_defaults`) and is refused where it would
    compute otherwise (:func:`output_refusals`). Importing transformers for that costs about 2 s of
    CPU here, more than copying a small MoE's weights, so the planner leaves the step on the plan:
    :func:`merger.plan.entry.settled` runs it (validation, the service's checks), and the engine runs
    it in a child process beside the merge (:func:`merger.plan.entry.settling_apart`), which stops at a
    refusal before anything is kept (docs/decisions.md, "MoE outputs keep what the base computes").

    Attributes:
        base_config: the base's parsed `config.json`.
        output_name: the output family's name, for refusals (`Mixtral`).
        state_layer_types: state the base's per-layer attention types (a Qwen2-MoE output, whose class
            windows other layers than Qwen2's by default).
    """

    base_config: dict
    output_name: str
    state_layer_types: bool = False

    def apply(self, output_config: dict) -> dict:
        """`output_config` with the base's class defaults stated.

        Raises:
            ArchitectureSettingError / ConfigProblems: one per setting the output would lose or change.
        """
        config, refusals = self.resolve(output_config)
        self.refuse(refusals)
        return config

    def resolve(self, output_config: dict) -> tuple[dict, tuple[str, ...]]:
        """`output_config` with the base's class defaults stated, and the refusals :meth:`refuse` raises:
        plain data, which a child process can send back (:func:`merger.plan.entry.settling_apart`)."""
        config = dict(output_config)
        if self.state_layer_types:
            types = getattr(effective_text_config(self.base_config), "layer_types", None)
            if isinstance(types, list):
                config.setdefault("layer_types", list(types))
        config = state_class_defaults(self.base_config, config)
        return config, output_refusals(self.base_config, config)

    def refuse(self, refusals: tuple[str, ...]) -> None:
        """Raise :meth:`resolve`'s refusals, if any.

        Raises:
            ArchitectureSettingError / ConfigProblems: one per setting the output would lose or change.
        """
        raise_problems([ArchitectureSettingError(f"a {self.output_name} output: {refusal}") for refusal in refusals])
