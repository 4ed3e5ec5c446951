"""mergekit's YAML schemas as pydantic models: merge configs and mergekit-moe configs.

The field names, nesting and defaults mirror mergekit so that configs from Hub model cards load
unchanged. Validators raise `ValueError`, so pydantic reports the field's location;
:func:`merger.config.load.load_config` turns that into a :class:`~merger.errors.ConfigError` whose message names the field, the value and
the fix. Checks that need the models' metadata (layer counts, shapes) live in :mod:`merger.plan.merge`.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merger.dtypes import DTYPES
from merger.config.references import PATH_PREFIXES, split_reference
from merger.ranges import MAX_FACTOR, Range
from merger.errors import ParameterValueError, StringTooLongError, excerpt

Scalar = Union[bool, int, float, str]

# Bounds of list fields and numbers (the text itself is bounded by merger.config.parse.LIMITS)
MAX_MODELS = 128  # models, sources of one slice, experts
MAX_SLICES = 512
MAX_PROMPTS = 256  # positive or negative prompts of one expert
MAX_TOKENS = 1024  # entries of `tokenizer.tokens`
MAX_REFERENCE_CHARS = 512  # a Hub id or local path
MAX_SHOWN_PROBLEMS = 10  # problems listed in one error; the rest are counted
LAYER_INDEX = Range(int, 0, 10_000, "a layer index")
SEED = Range(int, 0, 2**63 - 1, "the random seed")
FACTOR = Range(float, -MAX_FACTOR, MAX_FACTOR, "a multiplier")


class ConditionalParameter(BaseModel):
    """One entry of a filtered parameter list: applies `value` to tensors whose name contains `filter`."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[Scalar]]


# A parameter is a scalar, a gradient (list of numbers), or a list of filtered entries.
ParameterSetting = Union[Scalar, list[Scalar], list[ConditionalParameter]]
Parameters = dict[str, ParameterSetting]


class ModelReference(BaseModel):
    """A model as a config names it: a Hub id or a local path, optionally with `@revision` and a LoRA.

    Attributes:
        model: the Hub repo id or local directory, as written (minus the revision).
        revision: the Hub revision (branch, tag or commit), if given.
        lora: a PEFT LoRA adapter applied to the model as it is read (`model+lora`, or the
            `{model, lora}` form): a Hub id (optionally `@revision`) or a local folder; None without.
    """

    model_config = ConfigDict(frozen=True)
    model: str
    revision: str | None = None
    lora: str | None = None

    @classmethod
    def parse(cls, value: Any) -> "ModelReference":
        """Parse `"org/name"`, `"org/name@rev"`, `"./local/dir"`, `"org/name+org/adapter"` or a
        `{model, revision, lora}` dict (mergekit's `{model: {path}, lora: {path}}` too)."""
        if isinstance(value, ModelReference):
            return value
        if isinstance(value, dict):
            model, revision = _path_and_revision(value.get("model"), "model")
            lora = _lora_text(value["lora"]) if value.get("lora") is not None else None
            return cls(model=model, revision=revision or value.get("revision"), lora=lora)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"must be a Hub id like `org/name` or a local path, got `{excerpt(value)}`")
        _check_length(value)
        text = value.strip()
        lora = None
        if "+" in text and not os.path.exists(text):
            text, lora = text.split("+", 1)
            if not text.strip() or not lora.strip():
                raise ValueError(f"a LoRA reference is `model+adapter`, got `{excerpt(value)}`; give both parts")
        model, revision = split_reference(text)
        return cls(model=model, revision=revision, lora=lora)

    @property
    def base(self) -> "ModelReference":
        """The model without its LoRA (itself when it has none)."""
        return ModelReference(model=self.model, revision=self.revision) if self.lora else self

    @property
    def key(self) -> str:
        """Canonical identity: trailing slashes and `./` dropped, so spellings of one model compare equal."""
        key = f"{_canonical(self.model)}@{self.revision}" if self.revision else _canonical(self.model)
        return f"{key}+{_canonical(self.lora)}" if self.lora else key

    def __str__(self) -> str:
        text = f"{self.model}@{self.revision}" if self.revision else self.model
        return f"{text}+{self.lora}" if self.lora else text


def _canonical(path: str) -> str:
    path = path.rstrip("/")
    if path.startswith(PATH_PREFIXES) or os.path.isdir(path):
        path = os.path.normpath(os.path.expanduser(path))
    return path


def _path_and_revision(value: Any, field: str) -> tuple[str, str | None]:
    """`(path, revision)` of a `model:`/`lora:` value: a string, or mergekit's `{path, revision}`."""
    if isinstance(value, dict) and set(value) <= {"path", "revision"}:
        value, revision = value.get("path"), value.get("revision")
    else:
        revision = None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must give `{field}:` as a Hub id or a local path, got `{excerpt(value)}`")
    _check_length(value)
    if revision is not None and not isinstance(revision, str):
        raise ValueError(f"`{field}.revision` must be text, got `{excerpt(revision)}`")
    return value.strip(), revision


def _lora_text(value: Any) -> str:
    """A `lora:` value as `path` or `path@revision`."""
    path, revision = _path_and_revision(value, "lora")
    return f"{path}@{revision}" if revision else path


def _check_length(reference: str) -> None:
    if len(reference) > MAX_REFERENCE_CHARS:
        raise StringTooLongError(f"is {len(reference):,} characters (`{excerpt(reference)}`), over the "
                                 f"{MAX_REFERENCE_CHARS} limit for a Hub id or path")


def _reference(value: Any) -> ModelReference:
    return ModelReference.parse(value)


class InputModel(BaseModel):
    """An entry of `models:`: a model and its per-model `parameters`."""

    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    parameters: Parameters | None = None

    _parse_model = field_validator("model", mode="before")(classmethod(lambda cls, v: _reference(v)))


class InputSliceSource(BaseModel):
    """A source of an output slice: `layer_range` `[start, end)` of `model`, with its parameters."""

    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    _parse_model = field_validator("model", mode="before")(classmethod(lambda cls, v: _reference(v)))

    @field_validator("layer_range", mode="before")
    @classmethod
    def _layer_indices(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) == 2:
            for end in value:
                problem = LAYER_INDEX.problem(end)
                if problem:
                    raise ParameterValueError(f"ends {problem}")
        return value

    @field_validator("layer_range")
    @classmethod
    def _range_not_empty(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(
                f"must be [start, end) with 0 <= start < end (end is exclusive), got [{start}, {end}]; "
                f"e.g. [{max(start, 0)}, {max(start, 0) + 1}] takes one layer"
            )
        return value


class OutputSlice(BaseModel):
    """An entry of `slices:`: sources merged layer by layer into consecutive output layers."""

    model_config = ConfigDict(extra="forbid")
    sources: list[InputSliceSource] = Field(min_length=1, max_length=MAX_MODELS)
    base_model: ModelReference | None = None
    parameters: Parameters | None = None
    residual_weight: float | None = None  # parsed for compatibility; mergekit ignores it too

    _check_residual = field_validator("residual_weight", mode="before")(FACTOR.validator())

    _parse_base = field_validator("base_model", mode="before")(
        classmethod(lambda cls, v: None if v is None else _reference(v))
    )

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model}: {list(s.layer_range)}" for s in self.sources)
            raise ValueError(
                f"all sources of a slice must span the same number of layers, got {ranges}; "
                "make the `layer_range`s equally long"
            )
        return self


class TokenizerConfig(BaseModel):
    """The newer `tokenizer:` block (`source`, `tokens`, `pad_to_multiple_of`)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, Any] | None = Field(None, max_length=MAX_TOKENS)
    pad_to_multiple_of: int | None = None

    _check_pad = field_validator("pad_to_multiple_of", mode="before")(
        Range(int, 1, 65_536, "rows of the embedding, padded up to a multiple").validator()
    )




def _dtype(value: str | None) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"must be one of {', '.join(DTYPES)}, got `{excerpt(value)}`")
    return name


class MergeConfig(BaseModel):
    """A mergekit merge config (`merge_method` with `models:` or `slices:`).

    `models:` is kept as written; :meth:`output_slices` gives the slice view the planner uses (the
    whole model as one slice, the base added as a source when missing, as mergekit does).
    """

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[InputModel] | None = Field(None, max_length=MAX_MODELS)
    slices: list[OutputSlice] | None = Field(None, max_length=MAX_SLICES)
    base_model: ModelReference | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    seed: int | None = None
    name: str | None = None
    # merger's extension (docs/decisions.md): merge although an input has tensors the output's layout
    # does not describe; they are dropped and named in a warning instead of refusing the merge.
    drop_unknown_tensors: bool = False

    _parse_base = field_validator("base_model", mode="before")(
        classmethod(lambda cls, v: None if v is None else _reference(v))
    )
    _parse_dtypes = field_validator("dtype", "out_dtype", mode="before")(classmethod(lambda cls, v: _dtype(v)))
    _check_seed = field_validator("seed", mode="before")(SEED.validator())

    @model_validator(mode="before")
    @classmethod
    def _text_decoder_module(cls, data: Any) -> Any:
        """mergekit's `modules: {text_decoder: {models | slices}}` is the top-level `models` / `slices`: the text
        decoder is what they address, and other modules follow it (docs/decisions.md, "Multimodal")."""
        if not isinstance(data, dict) or "modules" not in data:
            return data
        modules = data["modules"]
        others = sorted(set(modules) - {"text_decoder"}) if isinstance(modules, dict) else []
        if not isinstance(modules, dict) or not isinstance(modules.get("text_decoder"), dict) or others:
            named = f", not `{'`, `'.join(map(str, others))}`" if others else ""
            raise ValueError(
                f"`modules` may hold only `text_decoder` (an object with `models` or `slices`){named}: the vision tower "
                "and projector are merged by the same method (or copied from the base when the inputs differ), "
                "so remove their entries"
            )
        body = modules["text_decoder"]
        if set(body) - {"models", "slices"} or "models" in data or "slices" in data:
            raise ValueError(
                "`modules.text_decoder` takes only `models` or `slices`, given instead of (not beside) the top-level "
                f"ones; got keys {sorted(body)}"
            )
        return {**{k: v for k, v in data.items() if k != "modules"}, **body}

    @model_validator(mode="after")
    def _models_or_slices(self) -> "MergeConfig":
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of `models:` (whole models) or `slices:` (layer ranges), not both or neither")
        if self.models is not None and not self.models:
            raise ValueError("`models:` is empty; list at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("`slices:` is empty; list at least one slice")
        return self

    def referenced_models(self) -> list[ModelReference]:
        """Every model the config names, base first if given, then config order; each once by canonical key."""
        refs: list[ModelReference] = [self.base_model] if self.base_model else []
        for item in self.models or []:
            refs.append(item.model)
        for output_slice in self.slices or []:
            refs.extend(source.model for source in output_slice.sources)
            if output_slice.base_model:
                refs.append(output_slice.base_model)
        return list({ref.key: ref for ref in reversed(refs)}.values())[::-1]

    @property
    def tokenizer_choice(self) -> str | None:
        """`base`, `union`, a model reference, or None when the config sets no tokenizer option.

        The legacy `tokenizer_source` wins over `tokenizer.source`.
        """
        if self.tokenizer_source:
            return self.tokenizer_source
        return self.tokenizer.source if self.tokenizer else None


class MoEExpert(BaseModel):
    """An expert of a mergekit-moe config: its dense model and (for prompt gates) its prompts."""

    model_config = ConfigDict(extra="forbid")
    source_model: ModelReference
    positive_prompts: list[str] | None = Field(None, max_length=MAX_PROMPTS)
    negative_prompts: list[str] | None = Field(None, max_length=MAX_PROMPTS)
    noise_scale: float | None = None
    residual_scale: float | None = None

    _parse_model = field_validator("source_model", mode="before")(classmethod(lambda cls, v: _reference(v)))
    _check_scales = field_validator("noise_scale", "residual_scale", mode="before")(FACTOR.validator())


# mergekit-moe's output names; `architecture:` picks those it is a prefix of (case-insensitive), as
# mergekit-moe does (`qwen` is Qwen MoE or Qwen3 MoE, settled by the inputs); the transformers
# `model_type`s are accepted too. DeepSeek is named so its refusal can say why (plan/moe.py).
MOE_OUTPUT_NAMES = {"mixtral": "mixtral", "qwen moe": "qwen2_moe", "qwen3 moe": "qwen3_moe", "deepseek moe": "deepseek",
                    "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek"}
MAX_SHARED_EXPERTS = 1  # mergekit-moe: "Currently only up to one shared expert is supported"


def moe_architecture_choices(architecture: str | None) -> tuple[str, ...]:
    """The output `model_type`s an `architecture:` value allows, mergekit-moe's prefix match.

    Args:
        architecture: the config's `architecture` (None or `auto`: every output).

    Returns:
        Sorted output types among `mixtral`, `qwen2_moe`, `qwen3_moe`, `deepseek`; empty when none matches.
    """
    wanted = (architecture or "auto").strip().lower()
    if wanted == "auto":
        return tuple(sorted(set(MOE_OUTPUT_NAMES.values())))
    return tuple(sorted({kind for name, kind in MOE_OUTPUT_NAMES.items() if wanted and name.startswith(wanted)}))


GATE_MODES = ("random", "uniform_random", "hidden", "hidden_avg", "hidden_last", "cheap_embed")
PROMPT_GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")  # routers computed from prompts


class MoEConfig(BaseModel):
    """A mergekit-moe config: dense experts assembled into a Mixtral, Qwen2-MoE or Qwen3-MoE around `base_model`."""

    model_config = ConfigDict(extra="forbid")
    base_model: ModelReference
    experts: list[MoEExpert] = Field(min_length=1, max_length=MAX_MODELS)
    gate_mode: Literal["random", "uniform_random", "hidden", "hidden_avg", "hidden_last", "cheap_embed"] = "hidden"
    experts_per_token: int = 2
    dtype: str | None = None
    out_dtype: str | None = None
    architecture: str | None = None
    shared_experts: list[MoEExpert] | None = Field(None, max_length=MAX_MODELS)
    tokenizer_source: str | None = None
    seed: int | None = None

    _parse_base = field_validator("base_model", mode="before")(classmethod(lambda cls, v: _reference(v)))
    _parse_dtypes = field_validator("dtype", "out_dtype", mode="before")(classmethod(lambda cls, v: _dtype(v)))
    _check_seed = field_validator("seed", mode="before")(SEED.validator())
    _check_top_k = field_validator("experts_per_token", mode="before")(
        Range(int, 1, MAX_MODELS, "experts routed per token").validator()
    )

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.gate_mode in PROMPT_GATE_MODES:
            self._check_prompts()
        if self.experts_per_token < 1 or self.experts_per_token > len(self.experts):
            raise ValueError(
                f"`experts_per_token` must be between 1 and the number of experts ({len(self.experts)}), "
                f"got {self.experts_per_token}"
            )
        if len(self.shared_experts or []) > MAX_SHARED_EXPERTS:
            raise ValueError(f"`shared_experts` lists {len(self.shared_experts)} experts; an output has at most "
                             f"{MAX_SHARED_EXPERTS} shared expert (as in mergekit-moe), so keep one")
        if not moe_architecture_choices(self.architecture):
            raise ValueError(f"`architecture: {excerpt(self.architecture)}` names no MoE output; use `auto` (from the "
                             "experts' family), `mixtral`, `qwen` (Qwen2-MoE or Qwen3-MoE) or `qwen3`")
        return self

    def _check_prompts(self) -> None:
        """mergekit-moe's rules for prompt gates: every expert has positive prompts, and the experts'
        prompts are not all the same (their router rows would be identical)."""
        named = [(f"experts[{i}]", e) for i, e in enumerate(self.experts)]
        named += [(f"shared_experts[{i}]", e) for i, e in enumerate(self.shared_experts or [])]
        for field_name, expert in named:
            if not expert.positive_prompts:
                raise ValueError(
                    f"`{field_name}.positive_prompts` is missing: `gate_mode: {self.gate_mode}` computes each "
                    "expert's router row (and a shared expert's gate) from its prompts; give each one or more "
                    "prompts showing what should go to it, or use `gate_mode: random`"
                )
        first = self.experts[0]
        if len(self.experts) > 1 and all(
            (e.positive_prompts, e.negative_prompts or []) == (first.positive_prompts, first.negative_prompts or [])
            for e in self.experts[1:]
        ):
            raise ValueError(
                "`experts[*].positive_prompts`: every expert has the same prompts, so every router row would be "
                f"the same under `gate_mode: {self.gate_mode}`; give each expert prompts of what it is for"
            )

    @property
    def merge_method(self) -> str:
        """`moe`: MoE configs have no `merge_method` key; the planner and card use this name."""
        return "moe"

    def referenced_models(self) -> list[ModelReference]:
        """The base, then each expert's model, then the shared experts', each once by canonical key, in config order."""
        refs = [self.base_model] + [e.source_model for e in self.experts + (self.shared_experts or [])]
        return list({ref.key: ref for ref in reversed(refs)}.values())[::-1]


AnyConfig = Union[MergeConfig, MoEConfig]
