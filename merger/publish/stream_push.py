"""Upload as you go: each finished shard is uploaded while the next is merged, then deleted; one commit at the end.

Shards go up as LFS objects (huggingface_hub's `preupload_lfs_files`), which stay invisible until a
commit names them, so the repo's content appears at once with the single `create_commit` of
:meth:`StreamPush.commit`, and a merge that fails or is cancelled before it leaves nothing visible:
a repo this push created is deleted (and noted beforehand through `before_create`, so that a crash
leaves it to the worker's sweep, :func:`merger.publish.hub_push.delete_unpushed_repo`).

Disk stays bounded: at most `max_pending` finished shards wait or upload while the next one is
written; the writer waits for a slot (docs/decisions.md, "Streaming from the Hub").
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from merger.errors import HubError
from merger.publish.hub_calls import hub_call
from merger.publish.hub_push import PushTarget, check_push_target, delete_created_repo, left_unchanged

logger = logging.getLogger(__name__)

MAX_PENDING_SHARDS = 2  # finished shards on disk (waiting or uploading) beside the one being written
# Shards uploading at once: one upload's own latency (hashing, the LFS calls, the Hub's check of the
# object) leaves the link idle; a second one fills it (measured: 100 MB shards at 100 MB/s took 1.4-2.2 s
# each, one at a time).
PARALLEL_UPLOADS = 2


class StreamPush:
    """A push to one model repo fed shard by shard: pass it as `run_merge(..., on_shard=push)`.

    Use as a context manager around the merge and :meth:`commit`: leaving it with an exception waits
    for the uploads in flight and deletes the repo if this push created it; a HubError of the push
    itself then ends with what is on the Hub.

    Args:
        repo_id: `namespace/name`, or a bare `name` for the token's own namespace.
        token: a Hugging Face token with write access there.
        private: create the repo as private.
        reuse_repo: push a new commit to the repo if it exists.
        before_create: called with the full repo id just before the repo is created (a note for the sweep).
        max_pending: finished shards kept on disk at most while they wait or upload.

    Raises:
        ConfigError, PushTargetError, HubError: the target, checked first (:func:`merger.publish.hub_push.check_push_target`).
    """

    def __init__(
        self,
        repo_id: str,
        token: str,
        *,
        private: bool = False,
        reuse_repo: bool = False,
        before_create: Callable[[str], None] | None = None,
        max_pending: int = MAX_PENDING_SHARDS,
    ):
        self.target: PushTarget = check_push_target(repo_id, token, private=private, reuse_repo=reuse_repo)
        self.token = token
        self._api = HfApi(token=token)
        self._private = private
        self._before_create = before_create
        self._created = False
        self._creating = threading.Lock()  # two uploads may start at once: the repo is created once
        self._uploaded: list[CommitOperationAdd] = []
        self._uploads = ThreadPoolExecutor(max_workers=PARALLEL_UPLOADS, thread_name_prefix="merger-upload")
        self._futures: list[Future] = []
        self._slots = threading.Semaphore(max_pending)
        self._spool: Path | None = None  # where taken shards wait for their upload

    def __enter__(self) -> "StreamPush":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # shards still queued are not uploaded; the one uploading cannot be stopped
            for future in self._futures:
                future.cancel()
        self._wait(raise_errors=False)
        self._uploads.shutdown()
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
        if exc_type is None:
            return
        settled, on_hub = (
            delete_created_repo(self._api, self.target.repo_id, self.token)
            if self._created
            else (True, left_unchanged(self.target.repo_id) if self.target.exists else "Nothing was pushed.")
        )
        if not settled:
            logger.warning("%s", on_hub)
        if isinstance(exc, HubError) and getattr(exc, "from_push", False):
            raise HubError(f"{exc} {on_hub}") from None

    def __call__(self, shard: Path, sha256: bytes | None = None) -> None:
        """Take a finished shard for upload: it moves to a folder of the push's own beside the merge's
        (the merge may move its folder before the upload ends), and is deleted once uploaded.
        Waits while `max_pending` shards are still on disk.

        `sha256`, the shard's as the writer hashed it, spares the upload a read of the whole file
        before it can start (its name on the Hub); None: it is read and hashed then.

        Raises:
            HubError: an earlier shard's upload failed (the merge stops).
        """
        self._raise_failed()
        self._slots.acquire()
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix=".upload-", dir=shard.parent.parent))
        taken = self._spool / shard.name
        os.replace(shard, taken)
        future = self._uploads.submit(self._upload, taken, sha256)
        # Run once the future is done (its waiters already woken): deleting a large file took up to 75 ms
        # here, which the commit need not wait for.
        future.add_done_callback(lambda _: self._free(taken))
        self._futures.append(future)

    def commit(self, folder: Path, commit_message: str = "Upload merged model") -> str:
        """Wait for the uploads, then make one commit of them and of every file left in `folder`.

        Args:
            folder: the finished output folder (its shards not uploaded yet, the index, configs, card).
            commit_message: the commit's title.

        Returns:
            The repo's URL, `{endpoint}/{namespace}/{name}`.

        Raises:
            HubError: an upload or the commit failed (leave the context to clean up).
        """
        self._wait(raise_errors=True)
        self._uploaded.sort(key=lambda op: op.path_in_repo)  # the order uploads finished in is timing
        done = {op.path_in_repo for op in self._uploaded}
        rest = [CommitOperationAdd(p.name, str(p)) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in done]
        self._create_repo()
        with self._pushing("pushing to"):
            self._api.create_commit(self.target.repo_id, operations=[*self._uploaded, *rest], commit_message=commit_message)
        return f"{self._api.endpoint}/{self.target.repo_id}"

    def _upload(self, shard: Path, sha256: bytes | None) -> None:
        self._create_repo()
        operation = CommitOperationAdd(path_in_repo=shard.name, path_or_fileobj=str(shard))
        if sha256 is not None:  # huggingface_hub hashes the file lazily, unless told (its public setter)
            operation.upload_info.sha256 = sha256
        with self._pushing("uploading a shard to"):
            self._api.preupload_lfs_files(self.target.repo_id, additions=[operation])
        self._uploaded.append(operation)

    def _free(self, shard: Path) -> None:
        """A shard's upload is over (done, failed or cancelled): it leaves the disk, and its slot is free."""
        try:
            shard.unlink(missing_ok=True)
        finally:
            self._slots.release()

    def _create_repo(self) -> None:
        with self._creating:
            if self.target.exists or self._created:
                return
            if self._before_create is not None:
                self._before_create(self.target.repo_id)
            with self._pushing("creating"):
                self._api.create_repo(self.target.repo_id, private=self._private)
            self._created = True

    def _pushing(self, action: str) -> AbstractContextManager[None]:
        return _push_call(f"{action} `{self.target.repo_id}`", self.token)

    def _raise_failed(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def _wait(self, raise_errors: bool) -> None:
        for future in self._futures:
            try:
                future.result()
            except BaseException:
                if raise_errors:
                    raise


@contextmanager
def _push_call(action: str, token: str) -> Iterator[None]:
    """hub_call, marking its HubError as the push's own (leaving the StreamPush then adds what is on the Hub)."""
    try:
        with hub_call(action, token):
            yield
    except HubError as err:
        err.from_push = True
        raise
