"""Hub tokens never leave the process in clear: one pattern and one scrubber for messages, logs and links."""

from __future__ import annotations

import re
from typing import Iterable

# User, API and OAuth tokens: `hf_` (or `hf_oauth_`) then a long alphanumeric secret; `hf_hub_download` is not one.
TOKEN_PATTERN = re.compile(r"\bhf_(?:oauth_)?[A-Za-z0-9]{20,}")


def scrub(text: str, known: Iterable[str | None] = ()) -> str:
    """Replace the `known` tokens and anything shaped like a Hub token with `***`.

    Args:
        text: a message, log line or traceback.
        known: tokens to remove whatever their shape (e.g. the job's own); None entries are skipped.

    Returns:
        The text without tokens.
    """
    for token in filter(None, known):
        text = text.replace(token, "***")
    return TOKEN_PATTERN.sub("***", text)
