"""Who is asking: the Hub username behind a token, remembered a few minutes per token."""

from __future__ import annotations

from merger.service.memo import Memo, digest

_owners: Memo[str] = Memo(ttl_s=300.0, size=1024)  # sha256 of a token -> its Hub username


def owner(token: str | None) -> str | None:
    """The Hub username a token belongs to (whoami, remembered a few minutes per token); None without one.

    Raises:
        HubError: the token was rejected or the Hub could not be reached.
    """
    if not token:
        return None
    key = digest(token)  # the memo never holds the token itself
    cached = _owners.get(key)
    if cached is not None:
        return cached
    from merger.publish.hub_push import whoami

    return _owners.put(key, whoami(token))
