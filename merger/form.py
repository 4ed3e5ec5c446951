"""The app's form as plain data: form values -> mergekit YAML, and YAML -> form values (best effort).

No gradio here: `app.py` maps widgets to :class:`FormValues` (:meth:`FormValues.from_widgets` /
:meth:`FormValues.to_widgets`) and everything else is pure and unit-tested.

The form covers four methods, in the shapes people post on model cards:

- `slerp`: two models, the first is `base_model`; `t` a number, a 5-point gradient, or the classic
  attention/MLP schedule. Whole models (`models:`), or one slice when a layer range is set.
- `linear`: models with weights, `normalize`.
- `passthrough`: one slice per row `(model, start, end)`, `end` exclusive.
- `moe`: the mergekit-moe schema (`base_model`, `gate_mode`, `experts_per_token`, `experts`).

A YAML the form cannot reproduce exactly (other methods, filtered per-model parameters, tokenizer
options, ...) still fills what it can, and :class:`ParsedForm` says to keep the YAML in the raw editor.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import DTYPES, SUPPORTED_GATE_MODES, ModelReference
from .errors import ConfigError, InvalidYamlError
from .parse import parse_config_text

FORM_METHODS = ("slerp", "linear", "passthrough", "moe")
METHOD_LABELS = {
    "slerp": "SLERP (two models)",
    "linear": "Linear (weighted average)",
    "passthrough": "Passthrough (stack layer ranges)",
    "moe": "Mixture of experts (mergekit-moe)",
}
AUTO_DTYPE = "auto"  # the form's choice for "no `dtype:`" (the base model's dtype)
DTYPE_CHOICES = (*DTYPES, AUTO_DTYPE)
GATE_MODES = SUPPORTED_GATE_MODES
MAX_MODELS = 6  # model pickers in the form (linear models, MoE experts)
GRADIENT_POINTS = 5

T_CONSTANT, T_GRADIENT, T_CLASSIC = "constant", "gradient", "attention/MLP schedule"
T_MODES = (T_CONSTANT, T_GRADIENT, T_CLASSIC)
# The classic SLERP schedule from mergekit's examples: attention drifts to the second model, MLPs back.
CLASSIC_T: list[dict[str, Any]] = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]
DEFAULT_GRADIENT = (0.0, 0.25, 0.5, 0.75, 1.0)
SLICE_COLUMNS = ("model", "start", "end")


@dataclass
class FormValues:
    """Everything the form holds. Blank model names are ignored when building the YAML.

    Attributes:
        method: one of :data:`FORM_METHODS`.
        models: slerp: `[base, other]`; linear: the models; moe: the experts (`source_model`s).
        weights: linear: one weight per entry of `models` (None = not set).
        normalize: linear `normalize`.
        base_model: moe: the `base_model` (attention, norms, embeddings donor).
        t_mode: slerp: one of :data:`T_MODES`.
        t: slerp `t` when `t_mode` is constant.
        t_gradient: slerp: the 5 gradient points when `t_mode` is gradient.
        layer_range: slerp: `(start, end)` (end exclusive) taken from both models, or None for whole models.
        slices: passthrough: rows `(model, start, end)`, end exclusive.
        gate_mode: moe: `random` or `uniform_random`.
        experts_per_token: moe `experts_per_token`.
        dtype: one of :data:`DTYPE_CHOICES` (`auto` leaves `dtype:` out).
    """

    method: str = "slerp"
    models: list[str] = field(default_factory=list)
    weights: list[float | None] = field(default_factory=list)
    normalize: bool = True
    base_model: str = ""
    t_mode: str = T_CONSTANT
    t: float = 0.5
    t_gradient: list[float] = field(default_factory=lambda: list(DEFAULT_GRADIENT))
    layer_range: tuple[int, int] | None = None
    slices: list[tuple[str, int, int]] = field(default_factory=list)
    gate_mode: str = "random"
    experts_per_token: int = 2
    dtype: str = "bfloat16"

    # ------------------------------------------------------------ widgets <-> values
    @classmethod
    def from_widgets(
        cls,
        method: str,
        models: list[str | None],
        weights: list[float | None],
        normalize: bool,
        base_model: str | None,
        t_mode: str,
        t: float | None,
        t_gradient: list[float | None],
        range_start: float | None,
        range_end: float | None,
        slice_rows: Any,
        gate_mode: str,
        experts_per_token: float | None,
        dtype: str,
    ) -> "FormValues":
        """Build values from raw widget values (None, blanks and floats tolerated).

        `models[i]` and `weights[i]` are the i-th picker row; rows with a blank model are dropped
        (with their weight). `slice_rows` is a list of `[model, start, end]` rows (or a DataFrame).
        """
        pairs = [(_text(m), w) for m, w in zip(models, list(weights) + [None] * (len(models) - len(weights)))]
        pairs = [(m, _number(w)) for m, w in pairs if m]
        start, end = _int(range_start), _int(range_end)
        return cls(
            method=method if method in FORM_METHODS else "slerp",
            models=[m for m, _ in pairs],
            weights=[w for _, w in pairs],
            normalize=bool(normalize),
            base_model=_text(base_model),
            t_mode=t_mode if t_mode in T_MODES else T_CONSTANT,
            t=_number(t) if _number(t) is not None else 0.5,
            t_gradient=[(_number(v) if _number(v) is not None else 0.0) for v in list(t_gradient)[:GRADIENT_POINTS]],
            # the browser sends 0 for an emptied number box: an end of 0 (or none) means whole models
            layer_range=(start or 0, end) if end else None,
            slices=_slice_rows(slice_rows),
            gate_mode=gate_mode if gate_mode in GATE_MODES else "random",
            experts_per_token=_int(experts_per_token) or 2,
            dtype=dtype if dtype in DTYPE_CHOICES else AUTO_DTYPE,
        )

    def to_widgets(self, num_pickers: int = MAX_MODELS) -> dict[str, Any]:
        """Widget values for these form values (the inverse of :meth:`from_widgets`).

        Returns:
            A dict with the same keys as :meth:`from_widgets`' arguments; `models` and `weights`
            padded to `num_pickers` (extra models beyond the pickers are dropped), `slice_rows` a list of
            `[model, start, end]` rows, `range_start`/`range_end` None for whole models.
        """
        models = (list(self.models) + [""] * num_pickers)[:num_pickers]
        weights = (list(self.weights) + [None] * num_pickers)[:num_pickers]
        gradient = (list(self.t_gradient) + list(DEFAULT_GRADIENT))[:GRADIENT_POINTS]
        return {
            "method": self.method,
            "models": models,
            "weights": weights,
            "normalize": self.normalize,
            "base_model": self.base_model,
            "t_mode": self.t_mode,
            "t": self.t,
            "t_gradient": gradient,
            "range_start": self.layer_range[0] if self.layer_range else None,
            "range_end": self.layer_range[1] if self.layer_range else None,
            "slice_rows": [[m, s, e] for m, s, e in self.slices],
            "gate_mode": self.gate_mode,
            "experts_per_token": self.experts_per_token,
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class ParsedForm:
    """The form values a YAML maps to.

    Attributes:
        values: the form values (best effort when not `exact`).
        exact: the form rebuilds an equivalent config; otherwise keep the YAML in the raw editor.
        note: when not exact, what the form cannot express (for a status line).
    """

    values: FormValues
    exact: bool
    note: str = ""


@dataclass(frozen=True)
class Example:
    """A one-click example config.

    Attributes:
        name: the file's stem (stable id).
        title: the button label: the file's first `# comment` line, else the prettified stem.
        yaml_text: the config.
    """

    name: str
    title: str
    yaml_text: str


# ---------------------------------------------------------------- form -> YAML
def build_config(values: FormValues) -> dict[str, Any]:
    """The config mapping for the form values, keys ordered like mergekit configs people post.

    Incomplete forms still give a mapping (e.g. `models: []`); validation reports what is missing.
    """
    dtype = None if values.dtype == AUTO_DTYPE else values.dtype
    method = values.method
    config: dict[str, Any]
    if method == "slerp":
        models = [m for m in values.models if m][:2]
        config = {"merge_method": "slerp"}
        if models:
            config["base_model"] = models[0]
        if values.layer_range is not None:
            start, end = values.layer_range
            config["slices"] = [{"sources": [{"model": m, "layer_range": [start, end]} for m in models]}]
        else:
            config["models"] = [{"model": m} for m in models]
        config["parameters"] = {"t": _slerp_t(values)}
    elif method == "linear":
        config = {"merge_method": "linear", "models": []}
        for model, weight in zip(values.models, list(values.weights) + [None] * len(values.models)):
            if not model:
                continue
            entry: dict[str, Any] = {"model": model}
            if weight is not None:
                entry["parameters"] = {"weight": _clean_number(weight)}
            config["models"].append(entry)
        config["parameters"] = {"normalize": bool(values.normalize)}
    elif method == "passthrough":
        config = {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": m, "layer_range": [int(s), int(e)]}]} for m, s, e in values.slices],
        }
    elif method == "moe":
        config = {"base_model": values.base_model}
        config["gate_mode"] = values.gate_mode
        if dtype:
            config["dtype"] = dtype
        config["experts_per_token"] = int(values.experts_per_token)
        config["experts"] = [{"source_model": m} for m in values.models if m]
        return config
    else:
        raise ConfigError(f"the form has no method `{method}`; use one of {', '.join(FORM_METHODS)} or edit the YAML")
    if dtype:
        config["dtype"] = dtype
    return config


def build_yaml(values: FormValues) -> str:
    """The config YAML for the form values (valid for :func:`merger.config.load_config` when complete)."""
    return dump_yaml(build_config(values))


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML the way configs are posted: keys in insertion order, short number lists inline (`[0, 32]`)."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True, width=120)


class _ConfigDumper(yaml.SafeDumper):
    """SafeDumper that writes lists of scalars in flow style and indents nested lists."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:  # noqa: ARG002
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:  # noqa: ARG002 - a shared list is written out, never as `&id001`
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    scalar = all(isinstance(v, (int, float, str, bool)) or v is None for v in data) and data
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=bool(scalar))


_ConfigDumper.add_representer(list, _represent_list)
_ConfigDumper.add_representer(tuple, _represent_list)


def _slerp_t(values: FormValues) -> Any:
    if values.t_mode == T_CLASSIC:
        return copy.deepcopy(CLASSIC_T)
    if values.t_mode == T_GRADIENT:
        return [_clean_number(v) for v in values.t_gradient]
    return _clean_number(values.t)


# ---------------------------------------------------------------- YAML -> form
def parse_yaml(text: str) -> ParsedForm:
    """The form values for a config YAML (from a share link, an example, or the raw editor).

    Never raises: YAML the form cannot read gives default values with `exact=False` and a note.
    `exact` is decided by rebuilding: the form's YAML must mean the same config as the input.
    The text goes through :func:`merger.parse.parse_config_text`, so the value walked here is bounded
    in size and depth (a limit it breaks is the note).
    """
    try:
        data = parse_config_text(text)
    except InvalidYamlError:
        return ParsedForm(FormValues(), False, "the YAML does not parse; fix it in the editor")
    except ConfigError as err:
        return ParsedForm(FormValues(), False, str(err))
    if not isinstance(data, dict):
        return ParsedForm(FormValues(), False, "the YAML is not a config mapping; fix it in the editor")
    try:
        values = _values_from_data(data)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError):
        return ParsedForm(FormValues(), False, "the form cannot read this config; edit it as YAML")
    try:
        exact = _canonical(build_config(values)) == _canonical(data)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError):
        exact = False
    if exact:
        return ParsedForm(values, True)
    return ParsedForm(values, False, _why_not_exact(data))


def _values_from_data(data: dict[str, Any]) -> FormValues:
    values = FormValues(dtype=_form_dtype(data.get("dtype")))
    if "experts" in data:
        values.method = "moe"
        values.base_model = _ref(data.get("base_model"))
        experts = data.get("experts") or []
        values.models = [_ref(e.get("source_model")) if isinstance(e, dict) else _ref(e) for e in experts]
        gate = data.get("gate_mode")
        values.gate_mode = gate if gate in GATE_MODES else "random"
        values.experts_per_token = _int(data.get("experts_per_token")) or 2
        return values

    method = str(data.get("merge_method", ""))
    params = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    models = data.get("models") if isinstance(data.get("models"), list) else None
    slices = data.get("slices") if isinstance(data.get("slices"), list) else None
    entries = [m for m in models or [] if isinstance(m, dict)]
    sources = [s for sl in slices or [] if isinstance(sl, dict) for s in sl.get("sources") or [] if isinstance(s, dict)]

    if method == "passthrough" or (method not in FORM_METHODS and slices is not None):
        values.method = "passthrough" if method == "passthrough" else _fallback_method(data)
        values.slices = [
            (_ref(s.get("model")), int(s["layer_range"][0]), int(s["layer_range"][1]))
            for s in sources
            if isinstance(s.get("layer_range"), (list, tuple)) and len(s["layer_range"]) == 2
        ]
        values.models = _unique(_ref(s.get("model")) for s in sources)
        return values

    if method == "slerp":
        values.method = "slerp"
        base = _ref(data.get("base_model"))
        names = [_ref(m.get("model")) for m in (entries if models is not None else sources)]
        ordered = ([base] + [n for n in names if n != base]) if base else names
        values.models = ordered[:2]  # best effort: a third model makes the config inexact
        if slices is not None and sources and isinstance(sources[0].get("layer_range"), (list, tuple)):
            start, end = sources[0]["layer_range"]
            values.layer_range = (int(start), int(end))
        _read_t(values, params.get("t"))
        return values

    # linear and the methods the form lacks: models with weights, where they are plain numbers
    values.method = "linear" if method == "linear" else _fallback_method(data)
    if models is not None:
        names = [_ref(m.get("model")) for m in entries]
    else:
        names = _unique(_ref(s.get("model")) for s in sources)
    values.models = names
    weights: list[float | None] = []
    for entry in entries:
        weight = (entry.get("parameters") or {}).get("weight") if isinstance(entry.get("parameters"), dict) else None
        weights.append(_number(weight))
    values.weights = weights + [None] * (len(names) - len(weights))
    if "normalize" in params:
        values.normalize = bool(params["normalize"])
    return values


def _fallback_method(data: dict[str, Any]) -> str:
    """The form method closest to a config whose method the form lacks (only fills the pickers)."""
    return "passthrough" if data.get("slices") is not None and data.get("models") is None else "linear"


def _read_t(values: FormValues, t: Any) -> None:
    if _number(t) is not None and not isinstance(t, bool):
        values.t_mode, values.t = T_CONSTANT, _as_typed(t)
    elif isinstance(t, list) and t and all(_number(v) is not None for v in t):
        values.t_mode = T_GRADIENT
        values.t_gradient = [_as_typed(v) for v in t][:GRADIENT_POINTS]
        values.t_gradient += [values.t_gradient[-1]] * (GRADIENT_POINTS - len(values.t_gradient))
    elif _canonical_value(t) == _canonical_value(CLASSIC_T):
        values.t_mode = T_CLASSIC


def _why_not_exact(data: dict[str, Any]) -> str:
    if "experts" in data:
        known = {"base_model", "gate_mode", "experts_per_token", "experts", "dtype"}
        extra = [k for k in data if k not in known]
        if extra:
            return f"the form has no field for {_keys(extra)}; edit it as YAML"
        if data.get("gate_mode") not in GATE_MODES:
            return f"`gate_mode: {data.get('gate_mode', 'hidden')}` is not in the form; edit it as YAML"
        return "the experts use options the form lacks (prompts, scales); edit it as YAML"
    method = data.get("merge_method")
    if method not in FORM_METHODS:
        return f"the form has no `{method}` method; edit it as YAML"
    known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype"}
    extra = [k for k in data if k not in known]
    if extra:
        return f"the form has no field for {_keys(extra)}; edit it as YAML"
    return "this config uses options the form lacks (filters, gradients, per-slice settings); edit it as YAML"


def _keys(keys: list[str]) -> str:
    return ", ".join(f"`{k}`" for k in keys)


# ---------------------------------------------------------------- canonical comparison
def _canonical(data: dict[str, Any]) -> Any:
    """A comparable form of a config: references as strings, defaults filled, None values dropped."""
    out = _canonical_value(data)
    if not isinstance(out, dict):
        return out
    if "dtype" in out:
        out["dtype"] = str(out["dtype"]).removeprefix("torch.")
    if "experts" in out:
        out.setdefault("experts_per_token", 2)
        out.setdefault("gate_mode", "hidden")
    elif out.get("merge_method") == "linear":
        params = out.setdefault("parameters", {})
        if isinstance(params, dict):
            params.setdefault("normalize", True)
    return out


def _canonical_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical_value(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


# ---------------------------------------------------------------- examples
def load_examples(directory: str | os.PathLike[str]) -> list[Example]:
    """The example configs in `directory` (`*.yaml` / `*.yml`), sorted by file name.

    A missing directory gives no examples; an unreadable file is skipped.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return []
    examples = []
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        examples.append(Example(name=path.stem, title=_example_title(path.stem, text), yaml_text=text))
    return examples


def _example_title(stem: str, text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            title = stripped.lstrip("#").strip()
            if title:
                return title
            continue
        break
    return re.sub(r"[-_]+", " ", stem).strip().capitalize() or stem


# ---------------------------------------------------------------- checks the app applies
def local_paths(yaml_text: str) -> list[str]:
    """The model references in a config that are local paths rather than Hub ids (for the Space's check).

    Unparseable YAML gives an empty list (validation reports the YAML itself).
    """
    try:
        data = parse_config_text(yaml_text)
    except ConfigError:
        return []
    found: list[str] = []

    def visit(node: Any, key: str | None = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, str(k))
        elif isinstance(node, list):
            for v in node:
                visit(v, key)
        elif key in ("model", "base_model", "source_model", "tokenizer_source", "source") and isinstance(node, str):
            if _is_local_path(node):
                found.append(node)

    visit(data)
    return _unique(found)


def _is_local_path(reference: str) -> bool:
    text = reference.strip()
    if text in ("base", "union"):
        return False
    path = text.split("@", 1)[0] if not os.path.exists(text) else text
    if path.startswith(("/", ".", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", path):
        return True
    if os.path.exists(path):
        return True
    return not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", path)


# ---------------------------------------------------------------- small helpers
def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(round(number))


def _clean_number(value: float) -> int | float:
    """Keep what a person typed: `1` stays an int in the YAML only when it was one."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def _as_typed(value: Any) -> int | float:
    """A number read from YAML, ints kept as ints (so the rebuilt YAML reads like the original)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def _ref(value: Any) -> str:
    if value is None:
        return ""
    try:
        return str(ModelReference.parse(value))
    except (ValueError, KeyError, TypeError):
        return str(value)


def _form_dtype(value: Any) -> str:
    if value is None:
        return AUTO_DTYPE
    name = str(value).removeprefix("torch.")
    return name if name in DTYPES else AUTO_DTYPE


def _slice_rows(rows: Any) -> list[tuple[str, int, int]]:
    if rows is None:
        return []
    if hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.values.tolist()
    out = []
    for row in rows:
        row = list(row) + [None] * 3
        model, start, end = _text(row[0]), _int(row[1]), _int(row[2])
        if not model and start is None and end is None:
            continue
        out.append((model, start if start is not None else 0, end if end is not None else 0))
    return out


def _unique(items: Any) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        if item:
            seen.setdefault(item, None)
    return list(seen)


__all__ = [
    "CLASSIC_T",
    "DTYPE_CHOICES",
    "Example",
    "FORM_METHODS",
    "FormValues",
    "GATE_MODES",
    "MAX_MODELS",
    "ParsedForm",
    "T_MODES",
    "build_config",
    "build_yaml",
    "dump_yaml",
    "load_examples",
    "local_paths",
    "parse_yaml",
]
