"""minihub: a minimal, stdlib-only, loopback Hugging Face Hub stand-in for tests.

Implements just enough of the Hub HTTP API for huggingface_hub 2.x:
whoami, list_models (search by substring), list_repo_commits (one page), model_info/repo_info (with `cardData` read from the
README front matter), list_repo_tree, create_repo, delete_repo, preupload + LFS batch/basic PUT +
ndjson commit (upload_folder/create_commit/upload_file with HF_HUB_DISABLE_XET=1), and HEAD/GET
/resolve with byte ranges (hf_hub_download, snapshot_download, get_safetensors_metadata).

Adopted from the project's shared tools so the test suite stands alone. Tests can make commits fail
on purpose: set `store.fail_commits` to an HTTP status, or to "drop" to close the connection unanswered;
hold them in flight with `store.hold_commits` (a threading.Event); slow it down with `store.delay_s`
seconds before each request whose path matches the regex `store.delay_paths` (None: all). `store.orgs` gives organizations
and their members' roles (whoami lists them; write/admin may create, push and delete there).

Range requests can be metered, throttled and broken (from another process: GET /_minihub/stats gives
the bytes served and received, POST /_minihub/throttle {"down_bps": .., "up_bps": ..} sets the limits): `store.served` counts the bytes sent per
`repo_id/path` and `store.ranges` logs each (repo_id, path, start, length) answered, both as they are sent (so a
client never finishes reading before they show); `store.down_bps` and
`store.up_bps` cap the bandwidth (bytes/s, shared by all connections, None: unlimited); `store.faults`
holds faults that each fire once on the next matching range request of a file: `Fault("drop", n)`
closes the connection after n bytes of the body, `Fault("short", n)` answers a range n bytes
shorter (with a matching Content-Range), as a server may; `Fault("whole", 0)` answers with the whole
file (200, as a server that ignores Range), `Fault("long", n)` sends n bytes past the range, its
Content-Length saying so. `store.cdn` (a base URL, e.g. the same server as `localhost`) makes a
`/resolve` of an LFS file answer 302 to `{cdn}/_cdn/{sha256}`, as the Hub sends large files from its
CDN; `store.cdn_authorizations` lists each CDN request's Authorization header (None: none sent).

Not implemented: Xet, multipart LFS, pagination, sort/filter/expand semantics, branches/tags/PRs
(a revision is `main` or a commit sha), org accounts of their own, paths-info, persistence across restarts. `cardData`
understands only top-level `key: value` and `key:` + `- item` lines of the front matter. A repo is gated
when its record has `gated` ("auto" / "manual"): its info is public, its files only for the owner and the
users in its `gated_users`.

usage: python minihub.py --port 0 --data DIR --token hf_good=alice [--token hf_other=bob]
Prints "LISTENING http://127.0.0.1:PORT" once ready. Binds 127.0.0.1 only.
"""
import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".onnx", ".msgpack", ".npy", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


# Bytes per read and write of a body: each passes the throttle once, so small chunks cost this Python
# server (which shares the benchmark's cores with the worker it serves) a lock and a sleep per 64 KiB.
CHUNK = 1 << 20


def now():
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def front_matter(text: str):
    """Top-level scalars and flat lists of a README's YAML front matter (the subset cards use), or None."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    data, key = {}, None
    for line in lines[1:]:
        if line.strip() == "---":
            return data
        if (item := re.fullmatch(r"\s*-\s+(.*)", line)) and key is not None:
            data[key] = (data[key] or []) + [item[1].strip().strip("'\"")]
        elif mm := re.fullmatch(r"([A-Za-z_][\w-]*):\s*(.*)", line):
            key = mm[1]
            data[key] = mm[2].strip().strip("'\"") or None
        else:
            key = None  # nested mappings are out of scope
    return None  # no closing `---`: not front matter


class Throttle:
    """A shared link of `rate` bytes/s: each chunk waits for its turn (all connections together).

    As on a real link, bytes keep crossing while the server handles the chunk before (hashing it,
    writing it to disk): time the link stood idle is credited, up to one chunk's worth (the bytes a
    socket buffer holds meanwhile). Without that credit the server's own work per chunk was added to
    every chunk's time: one upload got 80 MB/s of a 100 MB/s link, whatever the client did.
    """

    def __init__(self, rate):
        self.rate = rate
        self.next_free = time.monotonic()
        self.lock = threading.Lock()

    def pass_bytes(self, n):
        with self.lock:
            start = max(self.next_free, time.monotonic() - CHUNK / self.rate)
            self.next_free = start + n / self.rate
            done = self.next_free
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class Fault:
    """A fault that fires once, on the next range request of a file whose `repo_id/path` matches `path`.

    kind "drop": the connection is closed after `n` bytes of the body; "short": the range is answered
    `n` bytes shorter than asked (a valid, smaller Content-Range); "whole": the whole file is sent (200);
    "long": `n` zero bytes follow the range, with a Content-Length to match (not the Content-Range).
    """

    def __init__(self, kind, n, path=r"\.safetensors$", min_start=0):
        assert kind in ("drop", "short", "whole", "long")
        self.kind, self.n, self.path, self.min_start = kind, n, path, min_start  # min_start: spare header reads
        self.fired = False


class Store:
    """In-memory repo metadata; file bytes under DATA/blobs (regular) and DATA/lfs (LFS)."""

    def __init__(self, data_dir, tokens):
        self.data = data_dir
        os.makedirs(os.path.join(data_dir, "lfs"), exist_ok=True)
        os.makedirs(os.path.join(data_dir, "blobs"), exist_ok=True)
        self.tokens = tokens  # token -> username
        self.repos = {}  # (type, repo_id) -> dict
        self.lock = threading.RLock()
        self.fail_commits = None  # an HTTP status: every commit is refused with it; "drop": the connection is closed
        self.hold_commits = None  # a threading.Event: commits wait until it is set (an upload "in flight")
        self.orgs = {}  # org name -> {username: role ("admin", "write", "contributor", "read")}
        self.delay_s = 0.0  # seconds every matching request waits before it is answered (a slow Hub)
        self.delay_paths = None  # a regex searched in the request path; None: every request waits
        self.served = {}  # "repo_id/path" -> bytes of file content sent
        self.ranges = []  # (repo_id, path, start, length) of every file body, logged as it starts
        self.received = 0  # bytes of request bodies read (uploads)
        self.faults = []  # Fault objects, each fired once
        self.cdn = None  # a base URL: LFS files' /resolve answers redirect there (see the module's notes)
        self.cdn_authorizations = []  # each /_cdn request's Authorization header, None where none came
        self._down = self._up = None

    @property
    def down_bps(self):
        return self._down.rate if self._down else None

    @down_bps.setter
    def down_bps(self, rate):
        self._down = Throttle(rate) if rate else None

    @property
    def up_bps(self):
        return self._up.rate if self._up else None

    @up_bps.setter
    def up_bps(self, rate):
        self._up = Throttle(rate) if rate else None

    def take_fault(self, key, start):
        with self.lock:
            for fault in self.faults:
                if not fault.fired and re.search(fault.path, key) and start >= fault.min_start:
                    fault.fired = True
                    return fault
        return None

    def may_write(self, user, namespace):
        """Whether `user` may create or push repos under `namespace` (their own, or an org role of write/admin)."""
        return user is not None and (user == namespace or self.orgs.get(namespace, {}).get(user) in ("write", "admin"))

    def lfs_path(self, oid):
        return os.path.join(self.data, "lfs", oid)

    def blob_path(self, oid):
        return os.path.join(self.data, "blobs", oid)

    def card_data(self, commit):
        f = commit["files"].get("README.md")
        if f is None or f["lfs"]:
            return None
        with open(self.blob_path(f["blob_oid"]), encoding="utf-8", errors="replace") as fh:
            return front_matter(fh.read())

    def head(self, repo, rev):
        if rev in ("main", repo["default_branch"]):
            return repo["commits"][-1]
        for c in repo["commits"]:
            if c["oid"] == rev:
                return c
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as web servers set it: with Nagle's algorithm a short answer's body, written after its
    # headers, waited for the client's delayed ACK (40 ms on Linux), so each small call took 44 ms here
    # instead of 1 ms.
    disable_nagle_algorithm = True
    server_version = "minihub/0.1"
    store: Store = None  # set on the class
    log_requests = False

    # ---------------------------------------------------------------- helpers
    def log_message(self, fmt, *args):
        if self.log_requests:
            sys.stderr.write("minihub: " + (fmt % args) + "\n")

    @property
    def base(self):
        return f"http://{self.headers.get('Host') or '127.0.0.1'}"

    def body(self) -> bytes:
        return self._body

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self._read_exactly(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self._read_exactly(n) if n else b""

    def _streams_body(self, path):
        """An LFS object upload with a Content-Length: :meth:`lfs_put` streams its body to disk."""
        return (self.command == "PUT" and re.fullmatch(r"/_lfs/[0-9a-f]{64}", path) is not None
                and "chunked" not in self.headers.get("Transfer-Encoding", "").lower())

    def _stream_body_to(self, fh):
        """The request body into `fh`, through one reused buffer and the upload throttle; its sha256.

        A shard is hundreds of MB: held whole, its bytes would be copied twice into fresh memory, whose
        page faults cost this process more CPU than the rest of the upload (taken from the worker it
        shares the machine with in the benchmarks)."""
        left, digest = int(self.headers.get("Content-Length") or 0), hashlib.sha256()
        buffer = memoryview(bytearray(CHUNK))
        while left > 0:
            n = self.rfile.readinto(buffer[:min(CHUNK, left)])
            if not n:
                break
            if self.store._up is not None:
                self.store._up.pass_bytes(n)
            digest.update(buffer[:n])
            fh.write(buffer[:n])
            left -= n
        with self.store.lock:
            self.store.received += fh.tell()
        return digest.hexdigest()

    def _read_exactly(self, n):
        """n bytes of the request body, through the upload throttle."""
        out = bytearray()
        while len(out) < n:
            chunk = self.rfile.read(min(CHUNK, n - len(out)))
            if not chunk:
                break
            if self.store._up is not None:
                self.store._up.pass_bytes(len(chunk))
            out += chunk
        with self.store.lock:
            self.store.received += len(out)
        return bytes(out)

    def send(self, status, payload=None, headers=None, raw=None, head_only=False):
        data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        if raw is None and payload is not None:
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head_only and self.command != "HEAD":
            self.wfile.write(data)

    def error(self, status, code=None, message="error", headers=None):
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self.send(status, {"error": message}, headers=h)

    def user(self):
        """Return (username | None, bad_token: bool)."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None, False
        name = self.store.tokens.get(auth[7:].strip())
        return name, name is None

    def bad_credentials(self):
        self.error(401, None, "Invalid credentials in Authorization header")

    def visible(self, repo, user):
        return not repo["private"] or user == repo["owner"] or user in self.store.orgs.get(repo["owner"], {})

    def find(self, rtype, repo_id, user):
        repo = self.store.repos.get((rtype, repo_id))
        if repo is None or not self.visible(repo, user):
            # The Hub answers 401 + RepoNotFound for both "missing" and "private, not yours".
            self.error(401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def repo_json(self, repo, commit, blobs=False, card=False):
        siblings = []
        for path, f in sorted(commit["files"].items()):
            s = {"rfilename": path}
            if blobs:
                s.update(size=f["size"], blobId=f["blob_oid"])
                if f["lfs"]:
                    s["lfs"] = {"sha256": f["sha256"], "size": f["size"], "pointerSize": f["pointer_size"]}
            siblings.append(s)
        return {
            "_id": repo["id"], "id": repo["repo_id"], "modelId": repo["repo_id"], "author": repo["owner"],
            "sha": commit["oid"], "lastModified": commit["date"], "createdAt": repo["created"],
            "private": repo["private"], "disabled": False, "gated": repo.get("gated", False), "downloads": 0, "likes": 0,
            "tags": repo.get("tags", []), "library_name": None, "siblings": siblings,
            **({"cardData": self.store.card_data(commit)} if card else {}),
        }

    # ---------------------------------------------------------------- routing
    def do_GET(self):
        self.route()

    def do_HEAD(self):
        self.route()

    def do_POST(self):
        self.route()

    def do_PUT(self):
        self.route()

    def do_DELETE(self):
        self.route()

    def route(self):
        try:
            url = urlsplit(self.path)
            path, q = unquote(url.path), parse_qs(url.query)
            # always drain the body (keep-alive connections are reused); an LFS object's is streamed to disk
            self._body = None if self._streams_body(path) else self._read_body()
            if self.store.delay_s and (self.store.delay_paths is None or re.search(self.store.delay_paths, path)):
                time.sleep(self.store.delay_s)
            m = self.command
            user, bad = self.user()
            if bad and not path.startswith("/_lfs/"):
                return self.bad_credentials()
            if path == "/_minihub/stats" and m == "GET":  # for a benchmark in another process
                return self.send(200, {"served": sum(self.store.served.values()), "received": self.store.received})
            if path == "/_minihub/throttle" and m == "POST":
                limits = json.loads(self.body() or b"{}")
                self.store.down_bps, self.store.up_bps = limits.get("down_bps"), limits.get("up_bps")
                return self.send(200, {})
            if path == "/api/whoami-v2" and m == "GET":
                return self.whoami(user)
            if path == "/api/repos/create" and m == "POST":
                return self.create_repo(user)
            if path == "/api/repos/delete" and m == "DELETE":
                return self.delete_repo(user)
            if path == "/api/validate-yaml" and m == "POST":
                return self.send(200, {"errors": [], "warnings": []})
            if (mm := re.fullmatch(r"/api/(models|datasets|spaces)", path)) and m == "GET":
                return self.list_repos(TYPES[mm[1]], q, user)
            if mm := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/preupload/([^/]+)", path):
                return self.preupload(TYPES[mm[1]], mm[2], user)
            if mm := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/commit/([^/]+)", path):
                return self.commit(TYPES[mm[1]], mm[2], mm[3], user)
            if (mm := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/commits/([^/]+)", path)) and m == "GET":
                return self.commits(TYPES[mm[1]], mm[2], mm[3], user)
            if mm := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
                return self.tree(TYPES[mm[1]], mm[2], mm[3], (mm[4] or "").strip("/"), q, user)
            if mm := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                return self.info(TYPES[mm[1]], mm[2], mm[3] or "main", q, user)
            if (mm := re.fullmatch(r"/((?:datasets/|spaces/)?)([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)) and m == "POST":
                return self.lfs_batch({"": "model", "datasets/": "dataset", "spaces/": "space"}[mm[1]], mm[2], user)
            if (mm := re.fullmatch(r"/_lfs/([0-9a-f]{64})(/verify)?", path)) and m in ("PUT", "POST"):
                return self.lfs_put(mm[1], bool(mm[2]))
            if (mm := re.fullmatch(r"/_cdn/([0-9a-f]{64})", path)) and m in ("GET", "HEAD"):
                return self.cdn_object(mm[1])
            if (mm := re.fullmatch(r"/((?:datasets/|spaces/)?)([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)) and m in ("GET", "HEAD"):
                return self.resolve({"": "model", "datasets/": "dataset", "spaces/": "space"}[mm[1]], mm[2], mm[3], mm[4], user)
            self.error(404, None, f"Not implemented in minihub: {m} {path}")
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            if getattr(self, "_body", None) is None:  # a streamed body may be left unread: this connection cannot be reused
                self.close_connection = True
            self.error(500, None, f"minihub internal error: {e!r}")

    # ---------------------------------------------------------------- endpoints
    def whoami(self, user):
        if user is None:
            return self.bad_credentials()
        orgs = [{"type": "org", "name": org, "fullname": org, "roleInOrg": members[user]}
                for org, members in sorted(self.store.orgs.items()) if user in members]
        self.send(200, {"type": "user", "id": hashlib.md5(user.encode()).hexdigest()[:24], "name": user,
                        "fullname": user, "email": None, "emailVerified": False, "isPro": False, "orgs": orgs,
                        "auth": {"type": "access_token",
                                 "accessToken": {"displayName": "minihub", "role": "write", "createdAt": now()}}})

    def create_repo(self, user):
        body = json.loads(self.body() or b"{}")
        if user is None:
            return self.error(401, None, "You must be authenticated to create a repo")
        rtype = body.get("type") or "model"
        ns = body.get("organization") or user
        repo_id = f"{ns}/{body['name']}"
        url = f"{self.base}/{PREFIX[rtype]}{repo_id}"
        if not self.store.may_write(user, ns):
            return self.error(403, None, f"You don't have the rights to create a repo under the namespace {ns}")
        with self.store.lock:
            if (rtype, repo_id) in self.store.repos:
                return self.send(409, {"error": f"You already created this {rtype} repo", "url": url})
            gitattributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
            oid = git_blob_oid(gitattributes)
            with open(self.store.blob_path(oid), "wb") as fh:
                fh.write(gitattributes)
            first = {"oid": secrets.token_hex(20), "date": now(), "title": "initial commit", "files": {
                ".gitattributes": {"lfs": False, "size": len(gitattributes), "blob_oid": oid}}}
            self.store.repos[(rtype, repo_id)] = {
                "id": secrets.token_hex(12), "repo_id": repo_id, "type": rtype, "owner": ns,
                "private": body.get("visibility") == "private" or bool(body.get("private")),
                "created": now(), "default_branch": "main", "commits": [first]}
        self.send(200, {"url": url, "name": repo_id, "id": self.store.repos[(rtype, repo_id)]["id"]})

    def delete_repo(self, user):
        body = json.loads(self.body() or b"{}")
        rtype = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body['name']}"
        with self.store.lock:
            repo = self.find(rtype, repo_id, user)
            if repo is None:
                return
            if not self.store.may_write(user, repo["owner"]):
                return self.error(403, None, "You don't have the rights to delete this repo")
            del self.store.repos[(rtype, repo_id)]
        self.send(200, raw=b"")

    def list_repos(self, rtype, q, user):
        search = (q.get("search") or [""])[0].lower()
        author = (q.get("author") or [None])[0]
        limit = int((q.get("limit") or ["1000"])[0])
        out = []
        for (t, rid), repo in sorted(self.store.repos.items()):
            if t != rtype or not self.visible(repo, user):
                continue
            if search and search not in rid.lower():
                continue
            if author and repo["owner"] != author:
                continue
            j = self.repo_json(repo, repo["commits"][-1])
            j.pop("siblings")
            out.append(j)
        self.send(200, out[:limit])

    def info(self, rtype, repo_id, rev, q, user):
        repo = self.find(rtype, repo_id, user)
        if repo is None:
            return
        commit = self.store.head(repo, rev)
        if commit is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        self.send(200, self.repo_json(repo, commit, blobs="blobs" in q, card=True))

    def commits(self, rtype, repo_id, rev, user):
        repo = self.find(rtype, repo_id, user)
        if repo is None:
            return
        head = self.store.head(repo, rev)
        if head is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        history = repo["commits"][: repo["commits"].index(head) + 1]
        self.send(200, [{"id": c["oid"], "title": c["title"], "message": "", "date": c["date"],
                         "authors": [{"user": repo["owner"]}]} for c in reversed(history)])

    def tree(self, rtype, repo_id, rev, prefix, q, user):
        repo = self.find(rtype, repo_id, user)
        if repo is None:
            return
        commit = self.store.head(repo, rev)
        if commit is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        recursive = (q.get("recursive") or ["false"])[0].lower() in ("1", "true")
        entries, dirs = [], set()
        for path, f in sorted(commit["files"].items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1:] if prefix else path
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = "/".join(([prefix] if prefix else []) + parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
            if len(parts) > 1 and not recursive:
                continue
            e = {"type": "file", "oid": f["blob_oid"], "size": f["size"], "path": path}
            if f["lfs"]:
                e["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": f["pointer_size"]}
            entries.append(e)
        if prefix and not entries:
            return self.error(404, "EntryNotFound", f"{prefix} does not exist on {rev}")
        self.send(200, entries)

    def writable(self, rtype, repo_id, user):
        """The repo if `user` may write to it; otherwise the error is sent and None returned."""
        repo = self.find(rtype, repo_id, user)
        if repo is not None and not self.store.may_write(user, repo["owner"]):
            self.error(403, None, "You don't have write access to this repo")
            return None
        return repo

    def preupload(self, rtype, repo_id, user):
        body = json.loads(self.body() or b"{}")
        repo = self.writable(rtype, repo_id, user)
        if repo is None:
            return
        files = []
        for f in body.get("files", []):
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in base64.b64decode(f["sample"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None})
        self.send(200, {"files": files, "commitOid": repo["commits"][-1]["oid"]})

    def lfs_batch(self, rtype, repo_id, user):
        body = json.loads(self.body() or b"{}")
        repo = self.writable(rtype, repo_id, user)
        if repo is None:
            return
        objects = []
        for o in body.get("objects", []):
            obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if not os.path.exists(self.store.lfs_path(o["oid"])):
                obj["actions"] = {
                    "upload": {"href": f"{self.base}/_lfs/{o['oid']}", "header": {}},
                    "verify": {"href": f"{self.base}/_lfs/{o['oid']}/verify", "header": {}},
                }
            objects.append(obj)
        self.send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                  headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, oid, verify):
        if verify:
            ok = os.path.exists(self.store.lfs_path(oid))
            return self.send(200 if ok else 404, {"ok": ok})
        tmp = self.store.lfs_path(oid) + f".{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as fh:
            if self._body is None:
                digest = self._stream_body_to(fh)
            else:  # a chunked body, read whole by route()
                fh.write(self._body)
                digest = hashlib.sha256(self._body).hexdigest()
        if digest != oid:
            os.remove(tmp)
            return self.error(400, None, "sha256 mismatch")
        os.replace(tmp, self.store.lfs_path(oid))
        self.send(200, raw=b"")

    def commit(self, rtype, repo_id, rev, user):
        lines = [json.loads(l) for l in self.body().splitlines() if l.strip()]
        if self.store.hold_commits is not None:
            self.store.hold_commits.wait(timeout=120)
        if self.store.fail_commits == "drop":  # the Hub "goes away" mid-upload: no answer at all
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        if self.store.fail_commits:
            return self.error(self.store.fail_commits, None, "minihub: commit refused (failure injection)")
        with self.store.lock:
            repo = self.writable(rtype, repo_id, user)
            if repo is None:
                return
            parent = self.store.head(repo, rev)
            if parent is None:
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = dict(parent["files"])
            header = {}
            for item in lines:
                k, v = item["key"], item["value"]
                if k == "header":
                    header = v
                    if v.get("parentCommit") and v["parentCommit"] != repo["commits"][-1]["oid"]:
                        return self.error(412, None, "A commit has happened since. Please refresh and try again.")
                elif k == "file":
                    data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                    oid = git_blob_oid(data)
                    with open(self.store.blob_path(oid), "wb") as fh:
                        fh.write(data)
                    files[v["path"]] = {"lfs": False, "size": len(data), "blob_oid": oid}
                elif k == "lfsFile":
                    p = self.store.lfs_path(v["oid"])
                    if not os.path.exists(p):
                        return self.error(422, None, f"LFS object {v['oid']} was not uploaded")
                    size = os.path.getsize(p)
                    ptr = lfs_pointer(v["oid"], size)
                    files[v["path"]] = {"lfs": True, "size": size, "sha256": v["oid"], "blob_oid": git_blob_oid(ptr),
                                        "pointer_size": len(ptr)}
                elif k == "deletedFile":
                    if files.pop(v["path"], None) is None:
                        return self.error(404, "EntryNotFound", f"{v['path']} does not exist")
                elif k == "deletedFolder":
                    for p in [p for p in files if p.startswith(v["path"].rstrip("/") + "/")]:
                        del files[p]
                else:
                    return self.error(400, None, f"unsupported commit key {k}")
            c = {"oid": secrets.token_hex(20), "date": now(), "title": header.get("summary", ""), "files": files}
            repo["commits"].append(c)
        self.send(200, {"success": True, "commitOid": c["oid"], "pullRequestUrl": None,
                        "commitUrl": f"{self.base}/{PREFIX[rtype]}{repo_id}/commit/{c['oid']}"})

    def resolve(self, rtype, repo_id, rev, fpath, user):
        repo = self.store.repos.get((rtype, repo_id))
        if repo is None or not self.visible(repo, user):
            return self.error(401, "RepoNotFound", "Repository not found")
        commit = self.store.head(repo, rev)
        if commit is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if repo.get("gated") and user != repo["owner"] and user not in repo.get("gated_users", ()):
            return self.error(403, "GatedRepo", "Access to this model is restricted: accept its conditions first")
        f = commit["files"].get(fpath)
        if f is None:
            return self.error(404, "EntryNotFound", "Entry not found", headers={"X-Repo-Commit": commit["oid"]})
        disk = self.store.lfs_path(f["sha256"]) if f["lfs"] else self.store.blob_path(f["blob_oid"])
        size = f["size"]
        headers = {"X-Repo-Commit": commit["oid"], "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f["lfs"]:
            headers.update({"ETag": f'"{f["sha256"]}"', "X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": size})
        else:
            headers["ETag"] = f'"{f["blob_oid"]}"'
        if f["lfs"] and self.store.cdn:
            return self.send(302, headers={**headers, "Location": f"{self.store.cdn}/_cdn/{f['sha256']}"})
        self.send_file(disk, size, headers, repo_id, fpath)

    def cdn_object(self, oid):
        """An LFS object by its sha256, for anyone (the Hub's CDN takes signed URLs, not tokens)."""
        with self.store.lock:
            self.store.cdn_authorizations.append(self.headers.get("Authorization"))
        disk = self.store.lfs_path(oid)
        if not os.path.isfile(disk):
            return self.error(404, None, "Not found")
        self.send_file(disk, os.path.getsize(disk), {"Accept-Ranges": "bytes", "ETag": f'"{oid}"'}, "_cdn", oid)

    def send_file(self, disk, size, headers, repo_id, fpath):
        """A file's bytes, or the range the request asks for (206), with the store's faults and throttle;
        counted as `repo_id/fpath`'s (the CDN's: `_cdn/{sha256}`)."""
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        status = 200
        if rng and (mm := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())) and int(mm[1]) >= size:
            # as the Hub's CDN does: a range starting at or past the end (any range of a 0-byte file)
            return self.error(416, "RangeNotSatisfiable", "Range Not Satisfiable",
                              headers={"Content-Range": f"bytes */{size}"})
        if rng and (mm := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())) and size:
            start, end = int(mm[1]), min(int(mm[2]) if mm[2] else size - 1, size - 1)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        fault = self.store.take_fault(f"{repo_id}/{fpath}", start) if status == 206 else None
        if fault is not None and fault.kind == "short" and end - start + 1 > fault.n:
            end -= fault.n
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if fault is not None and fault.kind == "whole":
            status, start, end = 200, 0, size - 1
            del headers["Content-Range"]
        length = max(0, end - start + 1)
        extra = fault.n if fault is not None and fault.kind == "long" else 0
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(length + extra))
        self.end_headers()
        if self.command == "HEAD":
            return
        drop_after = fault.n if fault is not None and fault.kind == "drop" else length
        with self.store.lock:  # logged before the body: a client done reading never outruns its entry
            self.store.ranges.append((repo_id, fpath, start, min(length, drop_after)))
        sent = 0
        with open(disk, "rb") as fh:
            fh.seek(start)
            while sent < min(length, drop_after):
                chunk = fh.read(min(CHUNK, min(length, drop_after) - sent))
                if not chunk:
                    break
                if self.store._down is not None:
                    self.store._down.pass_bytes(len(chunk))
                self._count(repo_id, fpath, len(chunk))  # before the write, as the range's entry is
                self.wfile.write(chunk)
                sent += len(chunk)
        self.wfile.write(b"\0" * extra)
        if sent < length:  # a fault: the connection drops with the body unfinished
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    def _count(self, repo_id, fpath, n):
        with self.store.lock:
            key = f"{repo_id}/{fpath}"
            self.store.served[key] = self.store.served.get(key, 0) + n


def serve(port=0, data_dir=None, tokens=None, log_requests=False):
    """Start in a background thread; returns (server, base_url). Use server.shutdown() to stop.

    The server's `Store` is `server.store` (its repos, and `fail_commits` for failure injection).
    """
    import tempfile
    store = Store(data_dir or tempfile.mkdtemp(prefix="minihub-"), tokens or {})
    # A handler class per server, so that two servers in one process keep separate stores.
    handler = type("BoundHandler", (Handler,), {"store": store, "log_requests": log_requests})
    srv = ThreadingHTTPServer(("127.0.0.1", port), handler)
    srv.store = store
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--data", default=None)
    ap.add_argument("--token", action="append", default=[], help="TOKEN=USERNAME")
    ap.add_argument("--log", action="store_true")
    a = ap.parse_args()
    srv, url = serve(a.port, a.data, dict(t.split("=", 1) for t in a.token), a.log)
    print("LISTENING", url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.shutdown()
