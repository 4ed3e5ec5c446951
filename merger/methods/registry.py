"""The merge-method registry: one decorated function per method, its signature is its schema.

A method is a pure function of float32 tensors::

    @merge_method("linear", pretty_name="Linear", reference_url="https://arxiv.org/abs/2203.05482")
    def linear(tensors: list[Tensor], *, weight: PerModel[float], normalize: bool = True) -> Tensor: ...

- `tensors`: the non-base inputs of one output tensor, in config order, each of the same shape. The
  engine hands the method its own float32 buffers (a model listed twice gets two): a method may
  overwrite `tensors` and `base` in place to save memory, and may return one of them.
- `base`: present in the signature when the method treats the base model specially; annotated
  `Tensor` when a base is required, `Tensor | None = None` when optional. Without it, a configured
  base is simply one more entry of `tensors`.
- keyword-only parameters are the config's `parameters`: annotated `PerModel[...]` they are per-model
  (the method receives one value per entry of `tensors`), otherwise global; no default = required.
  A numeric parameter declares its type and range in its annotation, `Annotated[float, Range(...)]`
  (or the shorthands :data:`Fraction`, :data:`Factor`); a `bool` needs nothing more. Validation reads
  them from :attr:`ParameterSpec.range`, so a method's signature is the one home of its ranges.
  A trailing underscore is dropped from the config key, for keys that are Python keywords: the
  argument `lambda_` is the config's `lambda`.
- `generator` (keyword-only, `torch.Generator`), when declared, receives the run's seeded RNG.
- `elementwise=True` declares that output entry j depends only on entry j of each input (and the
  parameters, and what `prepare` computed): the engine then runs the method on consecutive slices of the flattened tensors, so it
  never holds float32 copies of whole tensors and its temporaries stay in cache. Slices are 1-D.
- `prepare`, for an elementwise method that needs whole-tensor statistics first (TIES's magnitude
  thresholds, DARE's masks and rescale factors, SLERP's angle): `prepare(slices, shape, **arguments)`
  gets a function returning a fresh iterator over the `(tensors, base)` slices, in order (valid until
  the next slice is drawn; not to be modified), the whole tensor's shape, and the method's other arguments
  (`generator` included); what it returns (never None) reaches every slice's call, in order, as
  `prepared`. A direct call of the method without `prepared` prepares from the whole tensors itself.
- `slices_in_any_order`, for a method with `prepare`: its slices' calls only read `prepared` (SLERP's
  coefficients, RAM+'s scales), so the engine may merge them in any order and several at once, each
  piece of a tensor apart (it then prepares from the inputs read once more, slice by slice). False
  where the slices consume it in flat order (TIES's trims count the ties kept so far, DARE's drops
  their offset).
- `fused`, for an elementwise method: `fused(tensors, [base,] out=..., **arguments)` merges one slice
  straight from the inputs' stored dtypes (float32, bfloat16 or float16 1-D CPU slices) into `out`,
  the output's slice in its own dtype, with exactly the bytes of `function` on float32 copies
  followed by the cast (the native kernels, `merger/methods/native/`). It returns False, having
  written and drawn nothing, where it cannot (no kernels, a dtype they do not read), and the engine
  converts the slice and calls `function`. It spares the conversions' passes over memory. Such a
  method's `prepare` gets its slices as stored too (float32, bfloat16 or float16), and converts
  where it computes with torch.

The package (`merger/methods/__init__.py`) imports every method module, so `METHODS` is complete on import.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Generic, Literal, TypeVar

from merger.errors import UnknownMethodError, excerpt
from merger.ranges import MAX_FACTOR, Range

T = TypeVar("T")


class PerModel(Generic[T]):
    """Marks a keyword parameter as per-model: the method gets `list[T]`, one per input tensor."""


# Entries per slice of a whole tensor, for the engine's elementwise calls and the prepare passes
# streamed reductions: four MiB of float32 per input, in cache; a multiple of the reductions' LANES,
# so SLERP's sums do not depend on the slicing.
SLICE = 1 << 20

FRACTION = Range(float, 0.0, 1.0, "a fraction")
FACTOR = Range(float, -MAX_FACTOR, MAX_FACTOR, "a multiplier")
Fraction = Annotated[float, FRACTION]  # density, gamma, epsilon, select_topk, slerp's t
Factor = Annotated[float, FACTOR]  # weight, lambda


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter of a method, read from its signature.

    Attributes:
        name: the config key (`weight`, `density`, `t`, `lambda`, ...).
        argument: the function's keyword argument (`name`, or `lambda_` for `lambda`).
        per_model: whether each model sets its own value.
        required: whether the config must set it (the base is exempt for per-model parameters).
        default: the value used when the config leaves it out.
        range: its type and allowed values, checked at validation.
    """

    name: str
    argument: str
    per_model: bool
    required: bool
    default: Any
    range: Range

    @property
    def gradient(self) -> bool:
        """Whether the config may give this parameter as a gradient or filtered values (a float: a gradient
        interpolates between its points, which an integer or a flag cannot be)."""
        return self.range.kind is float


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, parameters, base handling and card metadata.

    Attributes:
        name: the `merge_method` key.
        pretty_name: the name shown on the card and in the form.
        reference_url: the paper or source the card links to.
        function: the pure tensor function.
        parameters: per-model and global parameters, in signature order.
        base: `"none"` (a base is an ordinary input), `"optional"` or `"required"`.
        min_others / max_others: how many non-base models the method takes (max None = unbounded).
        uses_generator: whether the function takes the seeded `generator`.
        elementwise: whether the function may run on slices of the flattened inputs (see above).
        prepare: the whole-tensor pass an elementwise method needs first, or None.
        slices_in_any_order: whether slices may be merged apart, with the same `prepared` (see above).
        fused: the slice-to-output path of an elementwise method, or None (see above).
    """

    name: str
    pretty_name: str
    reference_url: str
    function: Callable[..., Any]
    parameters: tuple[ParameterSpec, ...]
    base: Literal["none", "optional", "required"]
    min_others: int
    max_others: int | None
    uses_generator: bool
    elementwise: bool = False
    prepare: Callable[..., Any] | None = None
    slices_in_any_order: bool = False
    fused: Callable[..., bool] | None = None

    @property
    def per_model_parameters(self) -> tuple[ParameterSpec, ...]:
        """The parameters each model sets for itself (`weight`, `density`, ...)."""
        return tuple(p for p in self.parameters if p.per_model)

    @property
    def global_parameters(self) -> tuple[ParameterSpec, ...]:
        """The parameters set once for the merge (`t`, `normalize`, `lambda`, ...)."""
        return tuple(p for p in self.parameters if not p.per_model)


METHODS: dict[str, MergeMethod] = {}
ENGINE_ARGUMENTS = ("generator", "prepared")  # keyword arguments the engine supplies, not the config


def merge_method(
    name: str,
    *,
    pretty_name: str,
    reference_url: str,
    min_others: int = 1,
    max_others: int | None = None,
    elementwise: bool = False,
    prepare: Callable[..., Any] | None = None,
    slices_in_any_order: bool = False,
    fused: Callable[..., bool] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a merge method under `name`, reading its parameters from the signature."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(function, include_extras=True)
        signature = inspect.signature(function)
        base = "none"
        if "base" in signature.parameters:
            base = "required" if signature.parameters["base"].default is inspect.Parameter.empty else "optional"
        parameters = tuple(
            ParameterSpec(
                name=p.name.removesuffix("_"),
                argument=p.name,
                per_model=typing.get_origin(hints[p.name]) is PerModel,
                required=p.default is inspect.Parameter.empty,
                default=None if p.default is inspect.Parameter.empty else p.default,
                range=_declared_range(name, p.name, hints[p.name]),
            )
            for p in signature.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ENGINE_ARGUMENTS
        )
        METHODS[name] = MergeMethod(
            name=name,
            pretty_name=pretty_name,
            reference_url=reference_url,
            function=function,
            parameters=parameters,
            base=base,
            min_others=min_others,
            max_others=max_others,
            uses_generator="generator" in signature.parameters,
            elementwise=elementwise,
            prepare=prepare,
            slices_in_any_order=slices_in_any_order,
            fused=fused,
        )
        return function

    return register


def _declared_range(method: str, argument: str, hint: Any) -> Range:
    """The :class:`Range` annotated on a parameter (inside `PerModel[...]` too); `bool` needs none."""
    if typing.get_origin(hint) is PerModel:
        hint = typing.get_args(hint)[0]
    for extra in getattr(hint, "__metadata__", ()):
        if isinstance(extra, Range):
            return extra
    if hint is bool:
        return Range(bool)
    raise TypeError(f"{method}: parameter `{argument}` needs `Annotated[..., Range(...)]` declaring its range")


def get_method(name: str) -> MergeMethod:
    """Look up a method by its `merge_method` name.

    Raises:
        UnknownMethodError: no such method; the message suggests the closest names.
    """
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name[:100].replace("-", "_"), METHODS, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(f'`{c}`' for c in close)}? " if close else ""
    raise UnknownMethodError(
        f"`merge_method: {excerpt(name)}` is not a known method; {hint}known methods: {', '.join(sorted(METHODS))}"
    )
