"""A Hub model's tensors read by HTTP range requests, only the bytes a plan needs, fetched ahead of the math.

:class:`HubWeights` is a :class:`~merger.io.sources.WeightSource`: the executor tells it the order it
will read tensors in (:meth:`HubWeights.expect`), and a thread of its own fetches them in that order,
in groups of up to :data:`GROUP_BYTES` (each group one range request per run of tensors adjacent in
the file), holding at most :data:`AHEAD_BYTES` (or one oversized group) not yet read. A frankenmerge
or an MoE thus downloads only the layers it uses, and memory stays bounded whatever the model's size.
A group is readable as it arrives: a read of part of a tensor (the executor's pieces,
:meth:`HubWeights.read_part_into`) waits only for that part's bytes, so the merge and the write of a
large tensor (an embedding matrix) run while the rest of it downloads.

The requests are urllib3's, reading into the group's buffer (:mod:`merger.publish.range_http`: at a
sixth of the CPU of huggingface_hub's client); every request pins the commit the metadata was read
from. A dropped connection, a 5xx or 429 answer, and a range whose size is wrong (short, long, or
starting elsewhere) are retried with backoff, resuming at the first byte not yet received, up to
:data:`RETRIES` times per range. What is verified: each answer's `Content-Range` (start, end, and the
file's total size against the size seen before) and byte count. The Hub's sha256 covers a whole LFS
file only, so a range's content cannot be checked against it; the pinned commit makes the bytes
immutable. A file already in the local HF cache (complete, same header) is read from there instead
(docs/decisions.md, "Streaming from the Hub").
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import build_hf_headers

from merger.errors import HubError, ModelFileError, TruncatedWeightsError, excerpt
from merger.io.metadata import HubCheckpoint, StoredTensor, read_safetensors_layout
from merger.io.sources import read_file_range
from merger.publish.hub_read import reading_model
from merger.publish.range_http import READ_PIECE, TRANSPORT_ERRORS, finish, get_range, raise_refusal

logger = logging.getLogger(__name__)

GROUP_BYTES = 64 * 2**20  # tensors fetched together (one request per run of adjacent ones), bytes
AHEAD_BYTES = 2 * GROUP_BYTES  # fetched but not yet read, per model (one group larger than this is allowed alone)
RETRIES = 5  # further tries of one range after a failed or wrong answer
BACKOFF_S = 0.25  # first wait before a retry, doubled after each
READ_TIMEOUT_S = 30  # seconds without data before a connection counts as dropped
_RETRIED_STATUS = (429, 500, 502, 503, 504)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _WrongRange(Exception):
    """An answer that is not the range asked for (retried)."""


@dataclass
class _Group:
    """Tensors fetched together: their bytes in one buffer, filled from its start, freed once each tensor
    has been read (to its last byte) as often as planned."""

    file: str
    tensors: dict[str, StoredTensor]
    reads: int  # reads planned from this group (a tensor read twice counts twice)
    nbytes: int = 0
    where: dict[str, int] = field(default_factory=dict)  # tensor -> offset in `buffer`, in file order
    buffer: torch.Tensor | None = None
    error: BaseException | None = None
    filled: int = -1  # bytes of `buffer` received so far, from its start (-1: no buffer yet)
    awaited: int | None = None  # the `filled` a reader waits for (None: none waits); reached, the fetcher wakes it
    arrival: threading.Condition = field(default_factory=threading.Condition)

    def lay_out(self) -> None:
        """Place the tensors in the buffer in file order (`where`)."""
        position = 0
        for name in sorted(self.tensors, key=lambda n: self.tensors[n].offset):
            self.where[name] = position
            position += self.tensors[name].nbytes

    def runs(self) -> list[tuple[int, int, int]]:
        """(offset in the file, offset in the buffer, bytes) of each run of tensors adjacent in the file."""
        runs: list[tuple[int, int, int]] = []
        for name, position in self.where.items():
            offset, nbytes = self.tensors[name].offset, self.tensors[name].nbytes
            if runs and runs[-1][0] + runs[-1][2] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + nbytes)
            else:
                runs.append((offset, position, nbytes))
        return runs

    def arrived(self, filled: int) -> None:
        """The fetcher's report: `buffer[:filled]` holds its final bytes (a retry may report less again)."""
        self.filled = max(self.filled, filled)
        awaited = self.awaited
        if awaited is not None and filled >= awaited:  # a lock per wake-up, not per chunk received
            with self.arrival:
                self.arrival.notify_all()

    def failed(self, error: BaseException) -> None:
        with self.arrival:
            self.error = error
            self.arrival.notify_all()

    def wait_for(self, filled: int, stop: threading.Event) -> bool:
        """Wait until `buffer[:filled]` has arrived (True), the fetch failed (`error`) or `stop` is set (False)."""
        with self.arrival:
            self.awaited = filled
            try:
                while self.filled < filled and self.error is None:
                    if stop.is_set():
                        return False
                    self.arrival.wait(0.1)
            finally:
                self.awaited = None
        return True


class HubWeights:
    """A Hub model's safetensors tensors, read by byte ranges (see the module's notes).

    Args:
        checkpoint: the repo, commit and file layouts from its metadata (:func:`merger.publish.hub_read.fetch_metadata`).
        token: a Hub token for private or gated repos (never logged).
        reference: the model as the config names it, for messages.

    Raises:
        TruncatedWeightsError: a file is shorter than its header says (before anything is read).
        HubError: from :meth:`read_into`, when a range cannot be read after :data:`RETRIES` retries,
            or the Hub refuses it (with the status and what to do). ModelNotFoundError: from
            :meth:`read_into`, when the repo has become gated, hidden or deleted since its metadata was read.
    """

    rereads = False  # each byte is fetched once, in the order `expect` gave

    def __init__(self, checkpoint: HubCheckpoint, token: str | None, reference: str):
        self.checkpoint = checkpoint
        self.token = token
        self.reference = reference
        self.tensors: dict[str, StoredTensor] = {}
        self._file_of: dict[str, str] = {}
        for file, layout in checkpoint.files.items():
            _refuse_cut_short(reference, file, layout, checkpoint.sizes.get(file))
            for name, stored in layout.items():
                self.tensors[name] = stored
                self._file_of[name] = file
        endpoint = constants.ENDPOINT  # HF_ENDPOINT or the Hub's, as HfApi's default
        self._urls = {f: hf_hub_url(checkpoint.repo_id, f, revision=checkpoint.revision, endpoint=endpoint) for f in checkpoint.files}
        self._headers = build_hf_headers(token=token)
        self._sizes: dict[str, int] = {}  # file -> total size, from the first answer's Content-Range
        self._local = {f: path for f in checkpoint.files if (path := self._cached(f)) is not None}
        self._pending: dict[str, deque[_Group]] = {}  # tensor -> the groups that will serve its next reads
        self._lock = threading.Condition()
        self._held = 0
        self._spare: torch.Tensor | None = None  # a freed group's uint8 buffer of GROUP_BYTES, for the next group
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def expect(self, names: Sequence[str]) -> None:
        """Start fetching `names` (the executor's read order, repeats included) in groups, ahead of the reads."""
        groups: list[_Group] = []
        for name in names:
            file, stored = self._file_of[name], self.tensors[name]
            if file in self._local:
                continue
            last = groups[-1] if groups else None
            if last is None or name not in last.tensors:
                if last is None or last.file != file or (last.nbytes and last.nbytes + stored.nbytes > GROUP_BYTES):
                    last = _Group(file, {}, 0)
                    groups.append(last)
                last.tensors[name] = stored
                last.nbytes += stored.nbytes
            last.reads += 1  # a tensor read twice within one group is fetched once
            self._pending.setdefault(name, deque()).append(last)
        for group in groups:
            group.lay_out()
        self._thread = threading.Thread(target=self._fetch_all, args=(groups,), name="merger-hub-fetch", daemon=True)
        self._thread.start()

    def read_into(self, name: str, view: memoryview) -> None:
        """Tensor `name`'s bytes into `view`: from its fetched group, the local cache, or a range of its own."""
        self.read_part_into(name, 0, view)

    def read_part_into(self, name: str, start: int, view: memoryview) -> None:
        """Bytes `[start, start + len(view))` of tensor `name` into `view`, as soon as they have arrived.

        A planned read of a tensor in parts reads them in order; the part that ends at the tensor's last
        byte completes the read (its group's buffer is freed after the group's last read).

        Raises:
            ValueError: the range is not within the tensor. HubError: as :meth:`read_into`.
        """
        file, stored = self._file_of[name], self.tensors[name]
        if start < 0 or start + len(view) > stored.nbytes:
            raise ValueError(f"bytes [{start}, {start + len(view)}) are not within tensor `{name}` ({stored.nbytes})")
        if file in self._local:
            self._read_cached(file, stored.offset + start, view, name)
            return
        last = start + len(view) == stored.nbytes
        with self._lock:
            queue = self._pending.get(name)
            group = (queue.popleft() if last else queue[0]) if queue else None
        if group is None:  # not planned (a re-read to explain an error): a range of its own
            self._fetch(file, stored.offset + start, view)
            return
        begin = group.where[name] + start
        if not group.wait_for(begin + len(view), self._stop):
            raise HubError(f"model `{excerpt(self.reference, 100)}`: reading stopped before `{name}` arrived")
        if group.error is not None:
            raise group.error
        if len(view):
            view[:] = memoryview(group.buffer.numpy())[begin : begin + len(view)]
        if last:
            self._read_done(group)

    def _read_cached(self, file: str, offset: int, view: memoryview, name: str) -> None:
        fd = os.open(self._local[file], os.O_RDONLY)
        try:
            read_file_range(fd, self._local[file], offset, view, name)
        finally:
            os.close(fd)

    def _read_done(self, group: _Group) -> None:
        """One planned read of `group` is over: after its last, the buffer is freed (kept as the spare)."""
        with self._lock:
            group.reads -= 1
            if group.reads == 0:
                if group.buffer.untyped_storage().nbytes() == GROUP_BYTES:
                    self._spare = torch.empty(0, dtype=torch.uint8).set_(group.buffer.untyped_storage())
                group.buffer = None
                self._held -= group.nbytes
                self._lock.notify_all()

    def close(self) -> None:
        """Stop fetching (the range in flight finishes or fails) and free the fetched buffers."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._pending.clear()
        self._spare = None

    # ---------------------------------------------------------------- fetching

    def _fetch_all(self, groups: list[_Group]) -> None:
        for i, group in enumerate(groups):
            with self._lock:
                while self._held and self._held + group.nbytes > AHEAD_BYTES and not self._stop.is_set():
                    self._lock.wait(0.1)
                if self._stop.is_set():
                    return
                self._held += group.nbytes
            try:
                self._fetch_group(group)
            except BaseException as err:  # every read still waiting gets the error
                for later in groups[i:]:
                    later.failed(err)
                return

    def _fetch_group(self, group: _Group) -> None:
        """The group's tensors in file order in one buffer: one request per run of tensors adjacent in the
        file, fetched in the buffer's order, so that what has arrived is always its start."""
        group.buffer = self._buffer(group.nbytes)
        buffer = memoryview(group.buffer.numpy())
        for offset, start, nbytes in group.runs():
            self._fetch(group.file, offset, buffer[start : start + nbytes], lambda n, start=start: group.arrived(start + n))
        group.arrived(group.nbytes)  # an empty group has no bytes to report

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of `nbytes`: the last freed group's when it fits, else a new one, of GROUP_BYTES
        unless the group is larger (so that it can serve any later group). Fresh memory costs a page
        fault per 4 KiB, which took more of the worker's CPU than the download itself (1 GB of new
        buffers per GB read); an oversized group's buffer is not kept."""
        with self._lock:
            if self._spare is not None and nbytes <= GROUP_BYTES:
                spare, self._spare = self._spare, None
                return spare[:nbytes]
        return torch.empty(max(nbytes, GROUP_BYTES), dtype=torch.uint8)[:nbytes]

    def _fetch(self, file: str, offset: int, view: memoryview, arrived: Callable[[int], None] | None = None) -> None:
        """Fill `view` from byte `offset` of `file` on the Hub, retrying and resuming (see the module's notes);
        `arrived(n)` is told each time `view[:n]` holds its final bytes."""
        done, tries = 0, 0
        action = f"reading model `{excerpt(self.reference, 100)}` (`{excerpt(file, 80)}`) from the Hub"
        with reading_model(self.reference, self.token):
            while done < len(view):
                if self._stop.is_set():
                    raise HubError(f"{action} was stopped")
                try:
                    done += self._request(file, offset + done, view[done:], arrived and (lambda n: arrived(done + n)))
                    continue  # all of it, or a short range or a drop after some bytes: the rest is asked for next
                except (*TRANSPORT_ERRORS, _WrongRange) as err:
                    reason = f"{type(err).__name__}: {excerpt(err, 120)}"
                tries += 1
                if tries > RETRIES:
                    raise HubError(f"{action} failed after {RETRIES} retries ({reason}); check the connection and retry")
                logger.warning("%s: retrying bytes %d-%d (%s)", action, offset + done, offset + len(view) - 1, reason)
                time.sleep(BACKOFF_S * 2 ** (tries - 1))

    def _request(self, file: str, start: int, view: memoryview, arrived: Callable[[int], None] | None) -> int:
        """One range request for `view`'s bytes from `start`; returns the bytes received (all, or a short range's).
        `arrived(n)` follows the bytes received (those of a range whose Content-Range was checked are final:
        the commit is pinned, so a retry of them brings the same bytes).

        Raises:
            _WrongRange: the answer is not that range (whole file, another start, wrong total size, too long);
                nothing of it is kept. TRANSPORT_ERRORS: the connection failed or dropped (bytes received
                before it count). HfHubHTTPError: a refusal that a retry cannot fix (401, 403, 404, ...).
        """
        end = start + len(view) - 1
        answer = get_range(self._urls[file], self._headers, start, end, READ_TIMEOUT_S)
        try:
            if answer.status in _RETRIED_STATUS:
                raise _WrongRange(f"HTTP {answer.status}")
            if answer.status >= 400:
                raise_refusal(answer, self._urls[file])
            if answer.status != 206:  # e.g. the whole file: not read
                raise _WrongRange(f"HTTP {answer.status} instead of a range")
            length = self._check_content_range(file, answer.headers.get("content-range", ""), start, end)
            received = 0
            try:
                while received < length:
                    got = answer.readinto(view[received : min(received + READ_PIECE, length)])
                    if not got:
                        break
                    received += got
                    if arrived is not None:
                        arrived(received)
            except TRANSPORT_ERRORS:
                if received:  # resume after what arrived, without counting a try
                    return received
                raise
            if received != length:  # the connection closed early, though urllib3 did not say so
                raise _WrongRange(f"{received} of {length} bytes")
            if answer.length_remaining:  # its Content-Length announced more than its Content-Range (None: chunked)
                raise _WrongRange(f"more bytes than the {length} its Content-Range announced")
            return received
        finally:
            finish(answer)

    def _check_content_range(self, file: str, value: str, start: int, end: int) -> int:
        """The answer's byte count, once its Content-Range is checked against the request and the file's size."""
        match = _CONTENT_RANGE.fullmatch(value.strip())
        if match is None or int(match[1]) != start or not start <= int(match[2]) <= end:
            raise _WrongRange(f"Content-Range `{excerpt(value, 60)}` for bytes {start}-{end}")
        if match[3] != "*":
            total = self._sizes.setdefault(file, int(match[3]))
            if total != int(match[3]):
                raise _WrongRange(f"the file's size changed from {total} to {match[3]} bytes")
        return int(match[2]) - start + 1

    def _cached(self, file: str) -> Path | None:
        """The file's copy in the local HF cache at the pinned commit, if its header matches the Hub's."""
        path = try_to_load_from_cache(self.checkpoint.repo_id, file, revision=self.checkpoint.revision)
        if not isinstance(path, str):
            return None
        try:
            same = read_safetensors_layout(Path(path)) == self.checkpoint.files[file]  # checked against its size too
        except (ModelFileError, OSError):  # a damaged cache entry: the Hub has the file
            return None
        return Path(path) if same else None


def _refuse_cut_short(reference: str, file: str, layout: dict[str, StoredTensor], size: int | None) -> None:
    """A file the Hub says is shorter than its header's last tensor is refused before any merge."""
    end = max((stored.offset + stored.nbytes for stored in layout.values()), default=0)
    if size is not None and end > size:
        raise TruncatedWeightsError(
            f"model `{excerpt(reference, 100)}`: `{excerpt(file, 80)}` on the Hub is {size:,} bytes but its header "
            f"places data up to byte {end:,}; the file is incomplete: use a revision whose upload finished"
        )
