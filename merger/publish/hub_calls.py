"""One Hub call's failures, as merger's errors: huggingface_hub and network exceptions become
:class:`~merger.errors.HubError`, whose messages are built here and scrubbed of tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx2  # huggingface_hub's HTTP client: its transport errors are what a dead network raises
from huggingface_hub import get_token
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from merger.errors import HubError, MergerError, excerpt
from merger.scrub import scrub


@contextmanager
def hub_call(action: str, token: str | None) -> Iterator[None]:
    """Re-raise huggingface_hub and network failures as HubError, with no token in the message."""
    try:
        yield
    except MergerError:
        raise
    except (httpx2.HTTPError, OSError) as err:
        # `from None`: the original exception's text is not ours to vouch for, so it is not chained.
        raise HubError(_scrub(_failure_message(action, err), token)) from None


def _failure_message(action: str, err: Exception) -> str:
    if isinstance(err, LocalTokenNotFoundError):
        return f"{action} needs a Hugging Face token: sign in (or set HF_TOKEN)."
    if isinstance(err, HfHubHTTPError):
        return _http_failure_message(action, err)
    cause = f"{type(err).__name__}: {excerpt(err, 160)}"  # a URL in it repeats the user's reference
    if isinstance(err, (httpx2.TransportError, ConnectionError)):
        return f"{action} failed: could not reach the Hub ({cause}); check the connection and retry."
    return f"{action} failed ({cause})."


def _http_failure_message(action: str, err: HfHubHTTPError) -> str:
    status = err.response.status_code
    if status == 401:
        return f"{action} failed: your Hugging Face token was rejected; sign in again."
    detail = f"HTTP {status}" + (f": {excerpt(err.server_message, 160)}" if err.server_message else "")
    if status == 403:
        return f"{action} was refused ({detail}); use a token with write access to that namespace."
    return f"{action} failed on the Hub ({detail}); retry, and check the Hub's status if it persists."


def _scrub(text: str, token: str | None) -> str:
    return scrub(text, (token, get_token()))
