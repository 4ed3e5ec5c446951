"""One model as a picker shows it: architecture, parameter count, license, gated state, or why it is refused.

Metadata only (the repo's info, `config.json`, safetensors headers, a README's first bytes), time-limited,
and remembered for a few minutes per model and token, so that a form re-rendered with the same models
asks the Hub nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from merger.service.memo import Memo, digest
from merger.errors import (
    AdapterModelError,
    ConfigError,
    GgufOnlyError,
    MergerError,
    ModelNotFoundError,
    QuantizedWeightsError,
    SafetensorsHeaderError,
    UnsafeWeightsError,
    excerpt,
)
from merger.scrub import scrub

MAX_REFERENCE_CHARS = 500  # longer text in a model box is no model (and never becomes a memo key)
DETAILS_TIMEOUT_S = 20.0  # a picker's line waits at most this long (a slow Hub gives a one-line reason)

# What a merge cannot read (GGUF, GPTQ/AWQ/EXL2/bitsandbytes/FP8, pickle-only, PEFT adapters): refused with the reason.
REFUSED_FORMATS = (GgufOnlyError, QuantizedWeightsError, UnsafeWeightsError, AdapterModelError, SafetensorsHeaderError)


@dataclass(frozen=True)
class ModelDetails:
    """What a picker shows under a selected model.

    Attributes:
        reference: the model as typed (`org/name`, `org/name@revision` or, off a Space, a folder).
        architecture: `config.json`'s first `architectures` entry (None when unknown).
        parameters: the number of weights over all safetensors tensors (None when not read).
        license: the card's license (None when the card states none).
        gated: `"auto"` / `"manual"` when the Hub asks users to accept the model's terms; None otherwise.
        private: the repo is private.
        refused: why a merge cannot use this model (a weights format it cannot read), one line; None when usable.
        problem: why the details could not be read (missing, no access, the Hub unreachable), one line.
    """

    reference: str
    architecture: str | None = None
    parameters: int | None = None
    license: str | None = None
    gated: str | None = None
    private: bool = False
    refused: str | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """The model can be merged as far as its metadata tells."""
        return self.refused is None and self.problem is None

    def summary(self) -> str:
        """One line: `MistralForCausalLM · 7.24B parameters · license apache-2.0 · not gated`, or the reason
        a merge cannot use the model (`refused: …`) or its details could not be read (after its gated state)."""
        access = {"auto": "gated (terms accepted automatically)", "manual": "gated (the owner approves access)"}
        gated = access.get(self.gated or "", "not gated")
        if self.refused:
            return f"refused: {self.refused}"
        if self.problem:
            return f"{gated} · {self.problem}" if self.gated else self.problem
        parts = [
            self.architecture or "unknown architecture",
            f"{count_text(self.parameters)} parameters" if self.parameters is not None else "",
            f"license {excerpt(self.license, 40) if self.license else 'unknown'}",
            gated,
            "private" if self.private else "",
        ]
        return " · ".join(p for p in parts if p)


# a model's details are reused for five minutes (a re-rendered form asks the Hub nothing)
_remembered: Memo[ModelDetails] = Memo(ttl_s=300.0, size=256)


def count_text(n: int) -> str:
    """A parameter count as people write it: `7.24B`, `125.03M`, `9.5K`."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def model_details(reference: str, token: str | None) -> ModelDetails:
    """A model's architecture, parameter count, license and gated state, from metadata only (no weights).

    Args:
        reference: `org/name`, `org/name@revision` (a `+lora` suffix is ignored), or off a Space a folder.
        token: the caller's Hub token (None when signed out): private and gated models need it.

    Returns:
        :class:`ModelDetails`; a model a merge cannot use has `refused` set (GGUF, quantised or pickle-only
        weights, a PEFT adapter); one that cannot be read has `problem` set. Never raises for a model's
        own faults or the Hub's: every failure is one line in the result.
    """
    reference = (reference or "").strip()
    if len(reference) > MAX_REFERENCE_CHARS:
        return ModelDetails(excerpt(reference, 80), problem=f"`{excerpt(reference, 80)}` is too long to be a model "
                                                            "id or a folder")
    key = digest(reference, token or "")
    hit = _remembered.get(key)
    if hit is not None:
        return hit
    from merger.timeouts import run_limited

    try:
        details = run_limited(lambda: _read(reference, token), DETAILS_TIMEOUT_S,
                              f"reading the metadata of `{excerpt(reference, 80)}`")
    except MergerError as err:
        return ModelDetails(reference, problem=_one_line(err))
    if details.problem is not None:
        return details  # not remembered: access granted or a file fixed shows at the next look
    return _remembered.put(key, details)


def _read(reference: str, token: str | None) -> ModelDetails:
    from merger.config.schema import ModelReference
    from merger.io.formats import check_layer_count, refuse_unmergeable_weights
    from merger.io.resolve import local_path
    from merger.io.metadata import read_local_metadata
    from merger.publish import hub_read

    try:
        ref = ModelReference.parse(reference).base
        path = local_path(ref)
    except (ConfigError, ModelNotFoundError) as err:
        return ModelDetails(reference, problem=_one_line(err))
    access = hub_read.RepoAccess(None, False, None) if path else hub_read.repo_access(str(ref), token)
    try:
        meta = read_local_metadata(path, str(ref)) if path else hub_read.fetch_metadata(str(ref), token=token)
        refuse_unmergeable_weights(meta)
        check_layer_count(meta)
    except REFUSED_FORMATS as err:
        return ModelDetails(reference, gated=access.gated, private=access.private, license=access.license,
                            refused=_one_line(err))
    except MergerError as err:  # gated without access, a broken file: the line says which
        return ModelDetails(reference, gated=access.gated, private=access.private, license=access.license,
                            problem=_one_line(err))
    architecture = (meta.config.get("architectures") or [None])[0]
    return ModelDetails(
        reference,
        architecture=excerpt(architecture, 60) if isinstance(architecture, str) else None,
        parameters=sum(t.numel for t in meta.tensors.values()),
        license=meta.license or access.license,
        gated=access.gated,
        private=access.private,
    )


def _one_line(err: Exception, limit: int = 400) -> str:
    text = " ".join(scrub(str(err)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
