"""Who is asking: the Hub username behind a token, remembered a few minutes per token."""

from __future__ import annotations

import hashlib
import threading
import time

_OWNER_TTL_S = 300.0
_OWNER_CACHE_SIZE = 1024
_owners: dict[str, tuple[str, float]] = {}  # sha256 of a token -> (its Hub username, when it expires)
_owners_lock = threading.Lock()


def owner(token: str | None) -> str | None:
    """The Hub username a token belongs to (whoami, remembered a few minutes per token); None without one.

    Raises:
        HubError: the token was rejected or the Hub could not be reached.
    """
    if not token:
        return None
    key = hashlib.sha256(token.encode()).hexdigest()  # the cache never holds the token itself
    now = time.monotonic()
    with _owners_lock:
        cached = _owners.get(key)
    if cached and cached[1] > now:
        return cached[0]
    from merger.publish.hub_push import whoami

    name = whoami(token)
    with _owners_lock:
        if len(_owners) >= _OWNER_CACHE_SIZE:
            _owners.clear()
        _owners[key] = (name, now + _OWNER_TTL_S)
    return name
