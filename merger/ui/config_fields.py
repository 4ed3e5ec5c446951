"""What the form shows, as data: fields, model rows, slice rows and the view of one config (pure, no gradio).

:mod:`merger.ui.config_view` (merge configs) and :mod:`merger.ui.config_view_moe` (mergekit-moe)
build these from a config mapping; :mod:`merger.ui.form_panel` renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from merger.dtypes import DTYPES
from merger.ui import config_settings as cs

MOE = "moe"  # the mergekit-moe schema (no `merge_method` key)
TOP_FIELDS = ("dtype", "out_dtype", "tokenizer_source", "chat_template", "seed")  # both schemas
MOE_FIELDS = ("gate_mode", "experts_per_token", "architecture")
TOKENIZER_CHOICES = ("base", "union")  # or a model reference
CHAT_TEMPLATES = ("chatml", "llama3", "alpaca", "mistral")


@dataclass(frozen=True)
class Field:
    """One widget: a parameter or a top-level option.

    Attributes:
        key: the config key (`weight`, `density`, `t`, `dtype`, ...).
        kind: `number`, `bool`, `choice`, `gradient` (a list of numbers), `filtered` (values per filter,
            see :mod:`merger.ui.config_settings`) or `text` (any other value, as inline YAML).
        value: the config's value, or None when the config leaves it out.
        default: what applies when left out (None: required or no default).
        choices: for `choice` (and the suggestions of a `text` box), the allowed values.
        minimum / maximum: the registry's range for numbers, when it declares one.
        gradient: whether the registry lets this parameter be a gradient or filtered values.
    """

    key: str
    kind: str
    value: Any
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    gradient: bool = False

    def layout(self) -> Any:
        """What decides this field's widgets: its kind, and a gradient's or filtered value's point counts."""
        return cs.layout_of(self.value) if self.kind in (cs.GRADIENT, cs.FILTERED) else self.kind


@dataclass(frozen=True)
class ModelRow:
    """One model of the merge (an expert for MoE) and its per-model parameters.

    Attributes:
        model: the model reference without its LoRA (`org/name` or `org/name@revision`).
        params: per-model parameters (an expert's `residual_scale` and `noise_scale`).
        lora: the LoRA adapter applied to it (`model+lora` or `{model, lora}`), empty without one.
        prompts: an expert's positive and negative prompts (empty for a merge's models).
    """

    model: str
    params: tuple[Field, ...] = ()
    lora: str = ""
    prompts: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())


@dataclass(frozen=True)
class SliceRow:
    """One source of a slice: layers `[start, end)` of `model`, with an optional `scale`.

    `slice` and `source` say where it sits: `slices[slice].sources[source]` (a passthrough slice has
    one source; a SLERP over a layer range has one slice with a source per model).
    """

    model: str
    start: int
    end: int
    scale: float | None = None
    slice: int = 0
    source: int = 0
    lora: str = ""


@dataclass(frozen=True)
class View:
    """What the form shows of a config.

    Attributes:
        method: the `merge_method`, or `moe`.
        base: `required`, `optional` or `none`: whether the form shows a base model picker.
        base_model: the config's `base_model` without its LoRA (empty when unset).
        rows: the `models:` entries (MoE: the experts); empty when the config uses slices.
        slices: the one-source slices, or None when the config has none the form can show.
        globals: the method's global parameters.
        options: the top-level options (dtype, tokenizer, chat template, seed; MoE gate fields).
        kept: paths of what the config holds that the form cannot show (left untouched).
        base_lora: the LoRA applied to the base model, empty without one.
        shared: an MoE's shared experts, or None where the schema takes none (or it is not an MoE).
    """

    method: str
    base: str
    base_model: str
    rows: tuple[ModelRow, ...]
    slices: tuple[SliceRow, ...] | None
    globals: tuple[Field, ...]
    options: tuple[Field, ...]
    kept: tuple[str, ...] = field(default_factory=tuple)
    base_lora: str = ""
    shared: tuple[ModelRow, ...] | None = None

    def structure(self) -> list:
        """What decides the widgets shown (not their values): a change here re-renders the form."""
        return [
            self.method,
            self.base,
            [_row_layout(r) for r in self.rows],
            None if self.slices is None else [(r.slice, r.source) for r in self.slices],
            [f.layout() for f in self.globals],
            None if self.shared is None else [_row_layout(r) for r in self.shared],
        ]


def _row_layout(row: ModelRow) -> list:
    return [[f.layout() for f in row.params], [len(p) for p in row.prompts]]


def options_of(data: dict[str, Any]) -> tuple[Field, ...]:
    """The top-level options both schemas share: dtype, out_dtype, tokenizer source, chat template, seed."""
    return (
        Field("dtype", "choice", data.get("dtype"), None, DTYPES),
        Field("out_dtype", "choice", data.get("out_dtype"), None, DTYPES),
        Field("tokenizer_source", "text", data.get("tokenizer_source"), None, TOKENIZER_CHOICES),
        Field("chat_template", "text", data.get("chat_template"), None, CHAT_TEMPLATES),
        Field("seed", "number", data.get("seed"), None, minimum=0),
    )


def reference_parts(value: Any) -> tuple[str, str]:
    """`(model, lora)` of a model reference as written: `org/m`, `org/m+org/adapter`, `{model, lora}`
    (either part may be mergekit's `{path, revision}`); a revision stays in its part (`org/m@rev`)."""
    if isinstance(value, dict):
        model = _path_text(value.get("model"))
        if value.get("revision") and "@" not in model:
            model = f"{model}@{value['revision']}"
        return model, _path_text(value.get("lora"))
    text = text_of(value)
    if "+" in text:
        model, lora = text.split("+", 1)
        return model.strip(), lora.strip()
    return text, ""


def _path_text(value: Any) -> str:
    if isinstance(value, dict):
        path, revision = text_of(value.get("path")), value.get("revision")
        return f"{path}@{revision}" if revision else path
    return text_of(value)


def params_of(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry's `parameters:` mapping (empty when absent or not a mapping)."""
    params = entry.get("parameters")
    return params if isinstance(params, dict) else {}


def text_of(value: Any) -> str:
    """A config value as stripped text (None: empty)."""
    return "" if value is None else str(value).strip()
