"""Every error the engine, the Hub layer and the worker raise on purpose.

Each message names the field (or file), the value, and the fix, so that the UI can show it verbatim
and the CLI can print it without a traceback. All inherit from :class:`MergerError`; builtin mixins
(`ValueError`, `FileNotFoundError`, ...) let callers catch them the usual way too.
"""

from __future__ import annotations

import reprlib
from typing import Iterable


class MergerError(Exception):
    """Base class of every error raised on purpose by merger. Its message is meant for the user."""


class ConfigError(MergerError, ValueError):
    """The merge config is malformed or inconsistent (a field, its value, and how to fix it)."""


class ConfigProblems(ConfigError):
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


def raise_problems(problems: Iterable[MergerError]) -> None:
    """The one rule for "one problem or several": raise nothing, the problem itself, or :class:`ConfigProblems`.

    Args:
        problems: the problems found, in order; duplicates (same message) are reported once.

    Raises:
        MergerError: the only problem, as itself; ConfigProblems: two or more.
    """
    unique = list({str(p): p for p in problems}.values())
    if len(unique) == 1:
        raise unique[0]
    if unique:
        raise ConfigProblems(unique)


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


# ---------------------------------------------------------------- jobs, ownership, push targets


class JobLimitError(MergerError):
    """Too many unfinished jobs: the user's own cap, or the app's global cap, is reached."""


class JobAccessError(MergerError, LookupError):
    """A job id is malformed, unknown, or belongs to another user (status, log, result and cancel are the owner's)."""


class PushTargetError(MergerError, ValueError):
    """The push target cannot be used as asked: no write access, repo exists without reuse, or visibility mismatch."""

# ---------------------------------------------------------------- models from the wild


class UnmergedTensorsError(ConfigError):
    """An input has tensors the output's layout does not describe, so the output would silently lack them.

    Args:
        message: the sentence (it names the first few tensors).
        model: the input that has them, as the config names it.
        tensors: every such tensor's name, for a front end that lists them all (the pre-flight).
    """

    def __init__(self, message: str, model: str = "", tensors: Iterable[str] = ()):
        super().__init__(message)
        self.model = model
        self.tensors = tuple(tensors)


class ArchitectureSettingError(ConfigError):
    """An input's architecture setting (rope, sliding window, biases, ...) cannot reach the output's config."""


class RemoteCodeError(MergerError, ValueError):
    """A model's `auto_map` names a code file the model does not ship, so the output could not load."""


# ---------------------------------------------------------------- hostile input
EXCERPT_LIMIT = 60  # characters of user input an error message may repeat


def excerpt(value: object, limit: int = EXCERPT_LIMIT) -> str:
    """A short, escaped rendering of user input, safe inside a Markdown code span of an error message.

    Control characters are escaped (`\\n`), backticks become `'` (so the value cannot close the span),
    and text past `limit` characters is cut, saying how long the whole was.

    Args:
        value: any user input (a string is shown without quotes, anything else as a shortened `repr`).
        limit: the most characters of the value shown.

    Returns:
        At most `limit` characters of the value plus a short `… (N characters)` note.
    """
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]  # as YAML spells them
    text = value if isinstance(value, str) else _SHORT_REPR.repr(value)
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit]).replace("`", "'")
    return shown if len(text) <= limit else f"{shown}… ({len(text):,} characters)"


_SHORT_REPR = reprlib.Repr()  # a nested value's repr stays short however large the value
_SHORT_REPR.maxlevel, _SHORT_REPR.maxdict, _SHORT_REPR.maxlist = 3, 4, 6
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = EXCERPT_LIMIT


class ConfigTooLargeError(ConfigError):
    """The config exceeds a parsing limit (text size, alias expansion, nesting, list or string length)."""


class YamlAliasError(ConfigTooLargeError):
    """YAML anchors/aliases would expand past the limit (a "billion laughs" bomb) or refer to themselves."""


class NestingTooDeepError(ConfigTooLargeError):
    """Lists or mappings are nested deeper than any config needs."""


class ListTooLongError(ConfigTooLargeError):
    """A list (or mapping) has more entries than the limit for its field."""


class StringTooLongError(ConfigTooLargeError):
    """A string (a key, a model reference, a prompt, a chat template) is longer than its limit."""


class InvalidYamlError(ConfigError):
    """The config text is not YAML (a syntax error), or holds tags or values YAML cannot read safely."""


class MultiDocumentError(ConfigError):
    """The text holds several YAML documents (`---` separated, mergekit-mega style); one config is merged at a time."""


class TokenInConfigError(ConfigError):
    """The config holds something shaped like a Hugging Face token (comments included); it is never stored."""


class ChatTemplateError(ConfigError):
    """`chat_template` is neither `auto`, a built-in name nor Jinja that compiles (file paths are never read)."""

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


# ---------------------------------------------------------------- per-request time limits


class ValidationTimeoutError(MergerError, TimeoutError):
    """Checking a config against the models' metadata took longer than its limit (`MERGER_VALIDATION_TIMEOUT_S`)."""


# ---------------------------------------------------------------- LoRA adapters and multi-stage configs


class LoraAdapterError(ModelFileError):
    """A LoRA adapter (`model+lora`) is not a PEFT LoRA merger can apply: missing or broken
    `adapter_config.json`, no safetensors weights, DoRA, unpaired or misshapen `lora_A`/`lora_B`."""


class AdapterTargetError(LoraAdapterError):
    """A LoRA adapter targets a tensor its model lacks, or one of another shape."""


class StageError(ConfigError):
    """A multi-stage config is inconsistent: a duplicate or missing `name:`, a stage naming a later
    stage, or too many stages."""

# ---------------------------------------------------------------- evaluation, weight report, suggestion


class EvalTextError(MergerError, ValueError):
    """An evaluation text cannot be used: missing, too large, not UTF-8, empty, or a dataset split not found."""


class EvalModelError(MergerError, ValueError):
    """A model cannot be evaluated: not a model folder, or it does not load with transformers."""


class SearchError(MergerError, ValueError):
    """A merge cannot be suggested for these models: wrong count, different shapes, or over the memory bound."""


# ---------------------------------------------------------------- weight report and suggestion on the page


class InsightLimitError(MergerError, ValueError):
    """A weight report or a suggested merge asked of the app is over its bounds (weights read, float32
    memory, candidates, minutes, pasted text), or another search is running; the message names the bound."""


# ---------------------------------------------------------------- review before the push


class StagedOutputError(MergerError):
    """A reviewed job's staged merge is gone from the worker's data folder (expired or deleted), so it cannot be published."""


# ---------------------------------------------------------------- prompt-routed MoE gates


class GatePromptError(ConfigError):
    """An expert's prompt cannot be run through the base for its router row: no tokens, or over the token caps."""


# ---------------------------------------------------------------- audit: the Space's weight-reading endpoints


class SignInRequiredError(MergerError, PermissionError):
    """A request that makes a Space read weights (weight report, suggested merge) came from a signed-out visitor."""
