"""Every error the engine, the Hub layer and the worker raise on purpose.

Each message names the field (or file), the value, and the fix, so that the UI can show it verbatim
and the CLI can print it without a traceback. All inherit from :class:`MergerError`; builtin mixins
(`ValueError`, `FileNotFoundError`, ...) let callers catch them the usual way too.
"""

from __future__ import annotations

from typing import Iterable


class MergerError(Exception):
    """Base class of every error raised on purpose by merger. Its message is meant for the user."""


class ConfigError(MergerError, ValueError):
    """The merge config is malformed or inconsistent (a field, its value, and how to fix it)."""


class ConfigErrors(ConfigError):
    """Several config problems found together; `problems` keeps them apart for the form.

    Args:
        problems: the individual errors, in the order found.
    """

    def __init__(self, problems: Iterable[MergerError]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = str(self.problems[0])
        else:
            message = f"{len(self.problems)} problems in the config:\n" + "\n".join(
                f"- {p}" for p in self.problems
            )
        super().__init__(message)


class UnknownMethodError(ConfigError):
    """`merge_method` names no registered method."""


class MissingParameterError(ConfigError):
    """A parameter the method requires is not set for some model or tensor (e.g. `weight`, `t`)."""


class ParameterValueError(ConfigError):
    """A parameter's value is outside its range (e.g. `density` must lie in [0, 1])."""


class BaseModelError(ConfigError):
    """`base_model` is missing where the method needs one, or absent from a slice's sources."""


class ModelCountError(ConfigError):
    """The method takes another number of models than the config lists (e.g. slerp: exactly two)."""


class WeightSumError(ConfigError):
    """`linear` weights sum to 0 with `normalize: true` (a division by zero)."""


class LayerRangeError(ConfigError):
    """A `layer_range` is empty, reversed, or past the model's last layer."""


class ShapeMismatchError(ConfigError):
    """Two inputs of one output tensor have incompatible shapes (different models' families or sizes)."""


class VocabSizeError(ShapeMismatchError):
    """Embedding matrices disagree in rows and no `tokenizer_source` says how to align them."""


class ArchitectureError(MergerError, ValueError):
    """A model's architecture is unknown, unsupported for this merge, or differs from the others'."""


class ModelNotFoundError(MergerError, FileNotFoundError):
    """A model reference is neither an existing local directory nor a reachable Hub repo."""


class UnsafeWeightsError(MergerError, ValueError):
    """A model ships only pickle checkpoints (`.bin`, `.pt`), which can run code when loaded."""


class HubError(MergerError, RuntimeError):
    """A Hub call failed (authentication, permissions, network); the message says which and why."""


class MergeCancelled(MergerError):
    """The job was cancelled by its owner while running; nothing was written or pushed."""


# ---------------------------------------------------------------- jobs, ownership, push targets (issue 8)


class JobLimitError(MergerError):
    """Too many unfinished jobs: the user's own cap, or the app's global cap, is reached."""


class JobAccessError(MergerError, LookupError):
    """A job id is malformed, unknown, or belongs to another user (status, log, result and cancel are the owner's)."""


class PushTargetError(MergerError, ValueError):
    """The push target cannot be used as asked: no write access, repo exists without reuse, or visibility mismatch."""


# ---------------------------------------------------------------- per-request time limits (issue 8: responsiveness)


class ValidationTimeoutError(MergerError, TimeoutError):
    """Checking a config against the models' metadata took longer than its limit (`MERGER_VALIDATION_TIMEOUT_S`)."""
