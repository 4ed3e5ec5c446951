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


# --- model files
class ModelFileError(MergerError, ValueError):
    """A model's files are broken or are not weights merger can merge; the message names the file and the fix."""


class ModelConfigFileError(ModelFileError):
    """`config.json` is not UTF-8, not JSON, not an object, or states no usable layer count."""


class SafetensorsHeaderError(ModelFileError):
    """A safetensors header is unreadable or inconsistent: its length, JSON, a dtype, or a tensor's byte range
    (outside the file, overlapping another, or not shape × dtype size)."""


class TruncatedWeightsError(ModelFileError):
    """A safetensors file is shorter than its header says (a download cut short), or empty."""


class WeightIndexError(ModelFileError):
    """`model.safetensors.index.json` is malformed, names a missing shard, or disagrees with the shards."""


class UnreadableModelFileError(ModelFileError):
    """The operating system refused to read a model file (a symlink loop, no permission, a directory)."""


class LfsPointerError(ModelFileError):
    """A Git LFS pointer file stands where the weights should be (cloned without `git lfs pull`)."""


class QuantizedWeightsError(ModelFileError):
    """The weights are quantised (GPTQ, AWQ, EXL2, bitsandbytes, FP8): packed integers cannot be averaged."""


class GgufOnlyError(ModelFileError):
    """The model ships only GGUF files (llama.cpp's format), no safetensors checkpoint."""


class AdapterModelError(ModelFileError):
    """The model is a PEFT (LoRA) adapter, not a full model."""


class NonFiniteWeightsError(ModelFileError):
    """An input model's tensor holds NaN or inf."""


class NonFiniteOutputError(MergerError, ArithmeticError):
    """A merged tensor came out with NaN or inf (overflow of the output dtype, or a parameter); nothing is kept."""


class OutputWriteError(MergerError, OSError):
    """The operating system refused to write the output (permissions, I/O error); the message names the path."""


class DiskSpaceError(OutputWriteError):
    """Not enough free space for the output, found before the merge or when a write ran out of space."""
