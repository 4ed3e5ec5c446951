"""Hub tokens never leave the process in clear: one pattern and one scrubber for messages, logs and links.

Log records are scrubbed when made (:func:`install_log_scrubbing`), of anything shaped like a token
and of the tokens this process is using (:data:`ACTIVE_TOKENS`: the worker's running jobs').
"""

from __future__ import annotations

import logging
import re
from typing import Iterable

# User, API and OAuth tokens: `hf_` (or `hf_oauth_`) then a long alphanumeric secret; `hf_hub_download` is not one.
TOKEN_PATTERN = re.compile(r"hf_(?:oauth_)?[A-Za-z0-9]{20,}")  # no word boundary: `my_hf_...` is a token too
ACTIVE_TOKENS: set[str] = set()  # tokens in use here (running jobs'), scrubbed from every log line


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


def scrub_log(text: str) -> str:
    """Replace every Hub token (the running jobs' and anything shaped like one) with `***`.

    Args:
        text: a log line, traceback or message.

    Returns:
        The text without tokens.
    """
    return scrub(text, tuple(ACTIVE_TOKENS))


class ScrubbingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments and traceback) never holds a Hub token."""

    def format(self, record: logging.LogRecord) -> str:
        """Format `record` as usual, then :func:`scrub_log` it."""
        return scrub_log(super().format(record))


def install_log_scrubbing() -> None:
    """Scrub Hub tokens from every log record this process makes, whatever logger or handler it goes to.

    A log record factory replaces the message (with its arguments) and the traceback text by their
    scrubbed forms when the record is made, so no handler, including those of httpx, gradio and
    uvicorn, ever sees a token. Installing twice is harmless.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "scrubs_tokens", False):
        return

    def make_record(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call is the handler's to report, as usual
            return record
        clean = scrub_log(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = scrub_log(logging.Formatter().formatException(record.exc_info))
        return record

    make_record.scrubs_tokens = True
    logging.setLogRecordFactory(make_record)
