"""The job records and the workers' notes in Redis, shared by the app and workers on several machines.

The backend of :mod:`merger.jobs.storage` when `constants.REDIS_URL` is set. The keys (prefix `merger:`):

- `job:<id>`: a hash holding every field of the job's record, each value JSON-encoded (so a new field of
  :class:`merger.jobs.store.Job` is stored with no change here, and dicts or lists round-trip);
- `unfinished`: a sorted set of the unfinished jobs' ids, scored by submission time (caps, queue position,
  the jobs of dead workers);
- `owner:<owner>`: a sorted set of the owner's job ids, scored by submission time ("My merges");
- `worker:<id>`: a worker's heartbeat, expiring `constants.WORKER_STALE_S` after it was written, so the
  server's clock alone decides who is alive (the machines' clocks may disagree); `last_beat`: the latest;
- `pending_repos`: a hash of job id -> the Hub repo the job is creating and its sealed token.

Every write that must be atomic is one Lua script (Redis runs a script alone): the caps' count with the
insert, and each status change as a compare-and-set with its index update. The scripts read job hashes
they do not name in KEYS, which a single Redis server allows (a Redis Cluster would not).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import redis

from merger import constants

_PREFIX = "merger:"
_JOB = _PREFIX + "job:"
_UNFINISHED = _PREFIX + "unfinished"
_OWNER = _PREFIX + "owner:"
_WORKER = _PREFIX + "worker:"
_LAST_BEAT = _PREFIX + "last_beat"
_PENDING = _PREFIX + "pending_repos"

# KEYS: the job's hash, the unfinished set, the owner's set. ARGV: id, created_at, owner (encoded), the
# per-user cap, the total cap, the job hashes' prefix, then the record's field/value pairs.
_INSERT = """
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
local mine = 0
for _, id in ipairs(ids) do
    if redis.call('HGET', ARGV[6] .. id, 'owner') == ARGV[3] then mine = mine + 1 end
end
if mine >= tonumber(ARGV[4]) or #ids >= tonumber(ARGV[5]) then return {mine, #ids} end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return {}
"""

# KEYS: the job's hash, the unfinished set. ARGV: id, the statuses allowed now (a JSON list of encoded
# values), the unfinished statuses (idem), then the changes' field/value pairs. Returns 1 if changed.
_UPDATE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
local allowed = false
for _, s in ipairs(cjson.decode(ARGV[2])) do
    if s == status then allowed = true end
end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
local now = redis.call('HGET', KEYS[1], 'status')
for _, s in ipairs(cjson.decode(ARGV[3])) do
    if s == now then return 1 end
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class RedisBackend:
    """:class:`merger.jobs.storage.JobBackend` on a Redis server (any number of machines).

    Args:
        url: a redis-py URL (`redis://[:password@]host:port/db`, `rediss://` for TLS).

    Raises (every method): redis.RedisError when the server cannot be reached or refuses the command.
    """

    def __init__(self, url: str):
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=30, health_check_interval=30)
        self._insert = self._redis.register_script(_INSERT)
        self._update = self._redis.register_script(_UPDATE)

    def insert(self, record: dict[str, Any], per_user: int, total: int) -> tuple[int, int] | None:
        job_id = record["id"]
        refused = self._insert(
            keys=[_JOB + job_id, _UNFINISHED, _OWNER + record["owner"]],
            args=[job_id, record["created_at"], _encode(record["owner"]), per_user, total, _JOB, *_pairs(record)],
        )
        return (int(refused[0]), int(refused[1])) if refused else None

    def unfinished_counts(self, owner: str) -> tuple[int, int]:
        owners = [record["owner"] for record in self.unfinished()]
        return owners.count(owner), len(owners)

    def get(self, job_id: str) -> dict[str, Any] | None:
        return _decode_record(self._redis.hgetall(_JOB + job_id))

    def update(self, job_id: str, changes: dict[str, Any], statuses: tuple[str, ...]) -> bool:
        return bool(self._update(
            keys=[_JOB + job_id, _UNFINISHED],
            args=[job_id, _encoded_list(statuses), _encoded_list(constants.UNFINISHED_STATUSES), *_pairs(changes)],
        ))

    def unfinished(self) -> list[dict[str, Any]]:
        return self._records(self._redis.zrange(_UNFINISHED, 0, -1))

    def owned(self, owner: str, limit: int) -> list[dict[str, Any]]:
        return self._records(self._redis.zrevrange(_OWNER + owner, 0, int(limit) - 1)) if limit > 0 else []

    def beat(self, worker_id: str, at: float) -> None:
        with self._redis.pipeline() as pipe:
            pipe.set(_WORKER + worker_id, at, px=int(constants.WORKER_STALE_S * 1000))
            pipe.set(_LAST_BEAT, at)
            pipe.execute()

    def last_beat(self) -> float | None:
        value = self._redis.get(_LAST_BEAT)
        return None if value is None else float(value)

    def is_alive(self, worker_id: str) -> bool:
        return bool(worker_id) and bool(self._redis.exists(_WORKER + worker_id))

    def note_repo(self, job_id: str, repo_id: str, sealed_token: bytes, at: float) -> None:
        note = {"repo_id": repo_id, "sealed_token": sealed_token.decode("ascii"), "created_at": at}
        self._redis.hset(_PENDING, job_id, json.dumps(note))

    def forget_repo(self, job_id: str) -> None:
        self._redis.hdel(_PENDING, job_id)

    def noted_repos(self) -> list[tuple[str, str, bytes]]:
        notes = [(job_id.decode(), json.loads(value)) for job_id, value in self._redis.hgetall(_PENDING).items()]
        notes.sort(key=lambda item: item[1]["created_at"])
        return [(job_id, note["repo_id"], note["sealed_token"].encode("ascii")) for job_id, note in notes]

    def _records(self, ids: list[bytes]) -> list[dict[str, Any]]:
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(_JOB + job_id.decode())
            hashes = pipe.execute()
        return [record for record in map(_decode_record, hashes) if record is not None]


@functools.cache
def redis_backend(url: str) -> RedisBackend:
    """The process's one backend (and connection pool) for `url`."""
    return RedisBackend(url)


def _encode(value: Any) -> str:
    return json.dumps(value)


def _encoded_list(values: tuple[str, ...]) -> str:
    return json.dumps([_encode(value) for value in values])


def _pairs(record: dict[str, Any]) -> list[str]:
    return [item for name, value in record.items() for item in (name, _encode(value))]


def _decode_record(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    return {name.decode(): json.loads(value) for name, value in fields.items()} or None
