"""What every panel needs: the caller's token, errors shown as one line, the app's public address."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import gradio as gr

from merger import constants
from merger.errors import MergerError
from merger.scrub import scrub

logger = logging.getLogger(__name__)

SIGN_IN_FIRST = "sign in with Hugging Face first"


def token_of(oauth_token: gr.OAuthToken | None) -> str | None:
    """The caller's Hub token: the OAuth token when signed in; off a Space, else `HF_TOKEN`.

    On a Space the Space's own token must never act for a visitor, so there is no fallback.
    """
    if oauth_token is not None and getattr(oauth_token, "token", None):
        return oauth_token.token
    if constants.ON_SPACE:
        return None
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token is a normal state here
        return None


def local_token_note() -> str:
    """The page header's line off a Space (no sign-in button there): which token merges use, or that none is set.

    Read at each page load, so setting `HF_TOKEN` and restarting, or logging in, shows at the next load.
    """
    if os.environ.get("HF_TOKEN"):
        return "Running locally: merges are pushed with the token in `HF_TOKEN`."
    if token_of(None):
        return "Running locally: merges are pushed with your saved Hugging Face login (`hf auth login`)."
    return ("Running locally with no Hugging Face token: checks of public models work, but to merge and push, "
            "set `HF_TOKEN` to a token with write access (or run `hf auth login`) and restart the app.")


def require_token(oauth_token: gr.OAuthToken | None) -> str:
    """The caller's token, or a gr.Error asking to sign in."""
    token = token_of(oauth_token)
    if not token:
        hint = "" if constants.ON_SPACE else " (running locally: set the HF_TOKEN environment variable)"
        raise gr.Error(f"{SIGN_IN_FIRST}{hint}", print_exception=False)
    return token


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn merger's errors into a gr.Error with their message; anything else into a short error, never a traceback.

    The error's class name is the gr.Error's title (gradio_client's `AppError.title`, the UI's pop-up
    heading), a stable label for scripts and tests; the message stays the user's sentence.
    """
    try:
        yield
    except gr.Error:
        raise
    except MergerError as err:
        raise gr.Error(scrub(str(err)), title=type(err).__name__, print_exception=False) from None
    except Exception as err:  # noqa: BLE001 - a bug must still reach the user as one line
        logger.exception("unexpected error in a handler")
        raise gr.Error(
            scrub(f"unexpected error ({type(err).__name__}); the details are in the app's log"),
            title="UnexpectedError",
            print_exception=False,
        ) from None


def one_line(err: Exception) -> str:
    """A handler's error as text for a status box (merger's message, or a short note for a bug)."""
    if isinstance(err, MergerError):
        return scrub(str(err))
    logger.exception("unexpected error in a handler")
    return f"unexpected error ({type(err).__name__}); the details are in the app's log"


def app_url(request: gr.Request | None) -> str:
    """The app's public address (for share and job links), ending in `/`."""
    host = os.environ.get("SPACE_HOST")
    if host:
        return f"https://{host.split(',')[0].strip()}/"
    raw = getattr(request, "request", None) if request is not None else None
    if raw is not None:
        try:
            from gradio.route_utils import get_root_url

            return get_root_url(raw, route_path=raw.url.path, root_path=raw.scope.get("root_path") or None) + "/"
        except Exception:  # noqa: BLE001 - fall back to a relative link
            logger.debug("could not work out the app's URL", exc_info=True)
    return "/"
