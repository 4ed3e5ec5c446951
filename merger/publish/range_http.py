"""The HTTP of the weights' byte ranges: urllib3, read straight into the merge's buffers.

huggingface_hub's client (httpx2) hands a body over in 64 KiB pieces, each parsed and copied several
times in Python: 2.0 CPU seconds per GiB here, which on two cores held a 200 MB/s download to
180-190 MB/s beside a merge. urllib3 reads :data:`READ_PIECE` at a time into the caller's buffer:
0.35 CPU s per GiB (docs/decisions.md, "Streaming from the Hub"). Only the weights' ranges go this
way, from the URLs and headers huggingface_hub builds (`hf_hub_url`, `build_hf_headers`), with its
trust store (`httpcore2.default_ssl_context`) and the environment's proxies (HTTP(S)_PROXY, NO_PROXY)
as its client reads them; every other Hub call, and the reading of the Hub's refusals
(`hf_raise_for_status`), stay huggingface_hub's.

Redirects are followed (the Hub answers a large file's range from its CDN); urllib3 drops the
`Authorization` header when one leads to another host, so the token never leaves the Hub.
"""

from __future__ import annotations

import threading
import urllib.request

import httpx2  # huggingface_hub's HTTP client: hf_raise_for_status reads its Response
import urllib3
from huggingface_hub.utils import hf_raise_for_status

READ_PIECE = 2**20  # bytes read into the buffer per call (each reported as arrived)
CONNECT_TIMEOUT_S = 10
MAX_REDIRECTS = 5
ERROR_BODY_BYTES = 64 * 2**10  # of a refusal's body, for the Hub's message in it
# A failed connection or a body cut short (the caller retries and resumes): urllib3 raises its own for socket
# errors too. Not OSError: huggingface_hub's refusals are OSErrors.
TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError,)
# The caller retries, and resumes where the bytes stopped; only redirects are urllib3's to follow.
_REDIRECTS_ONLY = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=MAX_REDIRECTS)

_pools: dict[str | None, urllib3.PoolManager] = {}  # proxy URL (None: direct) -> its connections, kept alive
_pools_lock = threading.Lock()


def get_range(url: str, headers: dict[str, str], first: int, last: int, read_timeout_s: float) -> urllib3.BaseHTTPResponse:
    """Ask for bytes `first`..`last` (inclusive) of `url`; the answer comes with its body unread.

    Args:
        url: the file's URL at a pinned commit (`hf_hub_url`).
        headers: huggingface_hub's headers for the call (`build_hf_headers`: the token, the user agent).
        first, last: the byte range, inclusive.
        read_timeout_s: seconds without data before the connection counts as dropped.

    Returns:
        urllib3's answer (any status, redirects followed); pass it to :func:`finish` when finished with it.

    Raises:
        urllib3.exceptions.HTTPError (:data:`TRANSPORT_ERRORS`): the Hub could not be reached.
    """
    timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=read_timeout_s)
    return _pool(url).urlopen("GET", url, headers={**headers, "range": f"bytes={first}-{last}"}, preload_content=False,
                              retries=_REDIRECTS_ONLY, timeout=timeout)


def finish(answer: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back for the next range when its body was read to the end, else close it (unread
    bytes would be read as the next answer)."""
    if not answer.isclosed():  # http.client closes the body once it has been read to its end
        answer.close()
    answer.release_conn()


def raise_refusal(answer: urllib3.BaseHTTPResponse, url: str) -> None:
    """Raise huggingface_hub's error for a refused range, with the Hub's message in it, as for any other Hub call.

    Raises:
        huggingface_hub.errors.HfHubHTTPError (or its subclasses: RepositoryNotFoundError, GatedRepoError...):
            for any status of 400 or more; an answer below 400 raises nothing.
    """
    body = answer.read(ERROR_BODY_BYTES)
    kept = [(k, v) for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-encoding")]
    hf_raise_for_status(httpx2.Response(answer.status, headers=kept, content=body, request=httpx2.Request("GET", url)))


def _pool(url: str) -> urllib3.PoolManager:
    """Connections to `url`'s host: through the proxy the environment names for its scheme unless NO_PROXY
    exempts the host, as huggingface_hub's client does (urllib.request's reading of the same variables)."""
    parsed = urllib3.util.parse_url(url)
    proxies = urllib.request.getproxies()
    proxy = None if urllib.request.proxy_bypass(parsed.host or "") else proxies.get(parsed.scheme or "", proxies.get("all"))
    with _pools_lock:
        if proxy not in _pools:
            import httpcore2  # huggingface_hub's transport, for its trust store; imported by the first range (0.1 s)

            options = {"maxsize": 8, "ssl_context": httpcore2.default_ssl_context()}  # a connection per model fetched at once
            _pools[proxy] = urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
        return _pools[proxy]
