"""Model references, "Hub id or local path, optionally `@revision`": the one place that reads them.

The config (:class:`merger.config.schema.ModelReference`), the Hub layer, the resolver and the card
all split and classify references here, so they agree: an existing local path is taken whole (a
folder may have `@` in its name); otherwise the revision follows the first `@` (a repo id never
holds `@`, a branch name may).
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

PATH_PREFIXES = ("./", "../", "/", "~")  # a reference written like this is a path, never a Hub id
# Config keys whose string values are model references.
REFERENCE_KEYS = ("model", "base_model", "source_model", "tokenizer_source", "source", "lora", "path")


def split_reference(reference: str) -> tuple[str, str | None]:
    """Split a model reference into the model (Hub repo id or local path) and the revision.

    Args:
        reference (`str`): `"org/name"`, `"org/name@revision"` (a branch, tag or commit sha) or a path.

    Returns:
        `tuple[str, str | None]`: the model and the revision (`None` when absent or empty, and for
        an existing local path, which is kept whole).
    """
    if "@" not in reference or os.path.exists(reference):
        return reference, None
    model, _, revision = reference.partition("@")
    return model, revision or None


def looks_like_hub_id(reference: str) -> bool:
    """Whether `reference` has the shape of a Hub repo id (`name` or `org/name`, optional `@rev`).

    Pure apart from :func:`split_reference`'s check for an existing path of that exact spelling.

    Args:
        reference (`str`): a model reference from a config.

    Returns:
        `bool`: `True` when the part before `@` passes huggingface_hub's `validate_repo_id`.
    """
    try:
        validate_repo_id(split_reference(reference)[0])
    except HFValidationError:
        return False
    return True


def is_hub_id(reference: str) -> bool:
    """Whether `reference` names a Hub repo rather than a local model directory.

    Args:
        reference (`str`): a model reference from a config.

    Returns:
        `bool`: `True` when no local path of that name exists, it is not written as a path
        (`./`, `../`, `/`, `~`) and it looks like a repo id (`name` or `org/name`, optional `@rev`).
    """
    model = split_reference(reference)[0]
    for spelling in (reference, model):  # `dir@main` is the folder `dir` to the resolver: a path too
        if spelling.startswith(PATH_PREFIXES) or Path(spelling).expanduser().exists():
            return False
    return looks_like_hub_id(reference)


def local_paths(data: Any) -> list[str]:
    """The model references in a parsed config that are local paths rather than Hub ids (a Space refuses them).

    Args:
        data: a parsed config value (:func:`merger.config.parse.parse_config_text`), any schema.

    Returns:
        Each local reference once, in the order found; `base` and `union` (tokenizer choices) are not models.
        A `model+adapter` reference counts each part.
    """
    found: dict[str, None] = {}

    def visit(node: Any, key: str | None = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, str(k))
        elif isinstance(node, list):
            for v in node:
                visit(v, key)
        elif key in REFERENCE_KEYS and isinstance(node, str) and node.strip() not in ("base", "union"):
            for part in node.strip().split("+") if not os.path.exists(node.strip()) else [node.strip()]:
                if part and not is_hub_id(part):
                    found[part] = None

    visit(data)
    return list(found)
