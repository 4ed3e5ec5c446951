"""Share links: a merge config packed into a URL (`?config=<payload>`).

The payload is the config YAML, zlib-compressed, then URL-safe base64 without padding. A link only
ever encodes config YAML: the functions here take no token and nothing but the YAML goes in, and a
YAML that itself contains something shaped like a Hugging Face token is refused, so a shared link
can never leak a credential. Both ways the YAML goes through :func:`merger.parse.parse_config_text`,
so a link carries nothing a pasted config could not (no alias bomb, no over-deep nesting).
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from urllib.parse import urlencode, urlsplit, urlunsplit

from .errors import ConfigError, InvalidYamlError, MultiDocumentError, excerpt
from .parse import LIMITS, parse_config_text

QUERY_KEY = "config"
MAX_PAYLOAD_CHARS = 64 * 1024  # far above any real config; keeps a hostile link from costing much
MAX_YAML_BYTES = LIMITS.max_bytes  # the decompressed YAML may not exceed a config's limit (a zip bomb stops here)

_DAMAGED = (
    "the shared link is damaged ({why}); copy the whole link again, or paste the config YAML into the editor"
)


def encode_config(yaml_text: str) -> str:
    """Pack a config's YAML into a URL-safe payload.

    Args:
        yaml_text: the config YAML, exactly as it will be restored.

    Returns:
        URL-safe base64 (no `=` padding) of the zlib-compressed UTF-8 text.

    Raises:
        ConfigError: whatever :func:`decode_config` would refuse, found at share time: a token
            (TokenInConfigError), a parsing limit (the errors of :func:`merger.parse.parse_config_text`),
            or a payload over `MAX_PAYLOAD_CHARS`.
    """
    _parse_for_link(yaml_text)
    packed = zlib.compress(yaml_text.encode("utf-8"), 9)
    payload = base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")
    if len(payload) > MAX_PAYLOAD_CHARS:
        raise ConfigError(f"the config packs into {len(payload):,} characters, over a link's {MAX_PAYLOAD_CHARS:,}; "
                          "remove what is not part of the merge (comments, unused keys) and share again")
    return payload


def decode_config(payload: str) -> str:
    """Unpack a payload made by :func:`encode_config` back into the YAML text.

    Raises:
        ConfigError: the payload is truncated, altered, too large or not a config link
            ("the shared link is damaged ..."); or the YAML breaks a parsing limit or holds a token
            (the errors of :func:`merger.parse.parse_config_text`; YAML syntax errors and several
            documents are left for the editor to show).
    """
    text = (payload or "").strip()
    if not text:
        raise ConfigError(_DAMAGED.format(why="it carries no config"))
    if len(text) > MAX_PAYLOAD_CHARS:
        why = f"the payload is {len(text):,} characters, over the {MAX_PAYLOAD_CHARS:,} limit"
        raise ConfigError(_DAMAGED.format(why=why))
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", text):
        raise ConfigError(_DAMAGED.format(why="it has characters a config payload never contains"))
    try:
        packed = base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES or inflater.unconsumed_tail:
            raise ConfigError(_DAMAGED.format(why=f"the config would be over {MAX_YAML_BYTES:,} bytes"))
        if not inflater.eof:
            raise ConfigError(_DAMAGED.format(why="it is cut short"))
        yaml_text = raw.decode("utf-8")
    except ConfigError:
        raise
    except (binascii.Error, ValueError, zlib.error) as err:
        raise ConfigError(_DAMAGED.format(why=f"it does not unpack: {excerpt(str(err), 120)}")) from None
    _parse_for_link(yaml_text)
    return yaml_text


def _parse_for_link(yaml_text: str) -> None:
    """The limits a link's YAML must keep, the same when it is made and when it is opened."""
    try:
        parse_config_text(yaml_text)
    except (InvalidYamlError, MultiDocumentError):
        pass  # shown in the editor, where the user can fix it


def share_url(base_url: str, yaml_text: str) -> str:
    """The app's URL with the config attached: `<base_url>?config=<payload>`.

    Any query or fragment already on `base_url` is dropped, so a token or job id in the current
    address never travels with the link.

    Args:
        base_url: the app's public address, e.g. `https://owner-merger.hf.space/`.
        yaml_text: the config YAML.
    """
    parts = urlsplit(base_url)
    query = urlencode({QUERY_KEY: encode_config(yaml_text)})
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))
