"""The plan of a merge: what every output tensor is made of (:class:`MergePlan`, :class:`TensorJob`).

Planning reads no weights: it needs each model's `config.json` and safetensors headers
(:class:`~merger.io.metadata.ModelMetadata`). :mod:`merger.plan.build` makes the plan of a mergekit
config (:mod:`merger.plan.moe` of a mergekit-moe one), :mod:`merger.plan.tensors` plans each output
tensor, :mod:`merger.plan.checks` holds the checks on the config and the models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from merger.config.schema import ModelReference
from merger.dtypes import DTYPE_SIZES, SAFETENSORS_CODES
from merger.plan.settings import ClassSettings
from merger.plan.tokenizer import VocabPlan

DEFAULT_SEED = 0


@dataclass(frozen=True)
class TensorSource:
    """One input of an output tensor: which model (canonical key) and which of its tensors."""

    model: str
    name: str


@dataclass(frozen=True)
class TensorJob:
    """How to produce one output tensor.

    Attributes:
        name: the output tensor's name.
        method: a registered method name, `"gate"` for an MoE router, or `"zeros"` (a tensor no input
            has and the output needs as zeros).
        sources: the inputs the method gets as `tensors`, in config order (for a method that
            treats the base specially, the base is not among them).
        base: the base model's input, for methods that take one.
        per_model: parameter name -> one value per entry of `sources`.
        global_params: parameter name -> value.
        shape: the output's shape.
        dtype: the output's safetensors dtype code (`BF16`, `F16`, `F32`).
        align_vocab: rows follow the vocabulary: permute each input onto the output vocabulary first.
    """

    name: str
    method: str
    sources: tuple[TensorSource, ...]
    base: TensorSource | None
    per_model: dict[str, tuple] = field(hash=False)
    global_params: dict[str, Any] = field(hash=False)
    shape: tuple[int, ...]
    dtype: str
    align_vocab: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of the output tensor in its output dtype."""
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


@dataclass(frozen=True)
class MergePlan:
    """Everything the engine needs to write the output, in write order.

    Attributes:
        method_name / pretty_name / reference_url: the method, for progress and the model card.
        base_model: the base's reference, if any.
        models: every referenced model, in config order (canonical keys unique).
        jobs: one per output tensor, in write order.
        output_config: the output's `config.json`.
        num_layers: decoder layers in the output.
        config_donor: key of the model whose config, generation config and architecture are used.
        tokenizer_donor: key of the model whose tokenizer files are copied.
        input_dtype: the config's `dtype`, applied to inputs on load (None: as stored).
        seed: seed of the random parts (DARE masks, random gates).
        vocab: the output vocabulary and row alignment, when the config sets a tokenizer option.
        warnings: things worth a look that do not stop the merge (e.g. input tensors no job reads).
        class_settings: the output config's step through transformers' config classes, not yet run (an
            MoE's; :func:`merger.plan.entry.settled` runs it), else None.
    """

    method_name: str
    pretty_name: str
    reference_url: str
    base_model: ModelReference | None
    models: tuple[ModelReference, ...]
    jobs: tuple[TensorJob, ...]
    output_config: dict
    num_layers: int
    config_donor: str
    tokenizer_donor: str
    input_dtype: str | None
    seed: int
    vocab: VocabPlan | None = None
    warnings: tuple[str, ...] = ()
    class_settings: ClassSettings | None = None


    @property
    def parameter_count(self) -> int:
        """Parameters in the output (sum of the output tensors' elements)."""
        return sum(math.prod(job.shape) for job in self.jobs)


def output_dtype(config_out: str | None, config_dtype: str | None, stored: str) -> str:
    """`out_dtype`, else `dtype`, else the stored dtype of the base (first) input (docs/decisions.md, Compatibility)."""
    chosen = config_out or config_dtype
    return SAFETENSORS_CODES[chosen] if chosen else stored


def set_config_dtype(config: dict, dtype: str | None) -> None:
    """Record the written dtype in a `config.json` dict (`dtype`, and the older `torch_dtype` if present)."""
    if dtype:
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
