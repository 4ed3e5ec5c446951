"""The app stays responsive under hostile load: ten slow requests run at once (configs whose models sit
on a Hub that answers slowly) while light requests still answer within seconds, and every slow one ends
with ValidationTimeoutError within its bound; a timed-out check stops at its next Hub call. Models are
read at once, each within the caller's deadline."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError

from app_harness import TOKEN, served_app
from merger import constants, timeouts
from merger.errors import ValidationTimeoutError

TIME_LIMIT_S = 3.0  # the validation limit for this test (the default is constants.VALIDATION_TIMEOUT_S)
HUB_DELAY_S = 8.0  # how long the loopback Hub takes to answer for a slow model
LIGHT_BOUND_S = 5.0  # what "answers within seconds" means here
SLACK_S = 4.0  # queueing, thread start and client overhead on a shared machine
SMALL_VALID = (
    "merge_method: slerp\nbase_model: tests/data/fixtures/mistral-prose\nmodels:\n"
    "  - model: tests/data/fixtures/mistral-prose\n  - model: tests/data/fixtures/mistral-code\n"
    "parameters:\n  t: 0.5\n"
)


def slow_config(index: int) -> str:
    """A linear merge of six models that live on the slow part of the Hub."""
    models = "".join(f"  - model: alice/slow-{index}-{k}\n    parameters: {{weight: 1.0}}\n" for k in range(6))
    return f"merge_method: linear\nmodels:\n{models}"


@pytest.fixture
def slow_hub(hub):
    hub.store.delay_s, hub.store.delay_paths = HUB_DELAY_S, r"^/api/models/alice/slow-"
    yield hub
    hub.store.delay_s, hub.store.delay_paths = 0.0, None


def _timed(call) -> tuple[object, float]:
    start = time.monotonic()
    try:
        return call(), time.monotonic() - start
    except AppError as err:
        return err, time.monotonic() - start


def test_light_requests_answer_while_ten_hostile_ones_run(slow_hub, tmp_path, monkeypatch) -> None:
    from merger.jobs import queue

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the fixtures' relative paths
    monkeypatch.setattr(constants, "VALIDATION_TIMEOUT_S", TIME_LIMIT_S)
    with served_app(tmp_path / "data") as (client, _):
        job_id = queue.submit("merge_method: linear\n", "alice/waiting", TOKEN, "alice")
        client.predict(job_id, api_name="/job_status")  # the owner lookup is cached from here on

        start = time.monotonic()
        hostile = [client.submit(slow_config(i), api_name="/validate") for i in range(8)]
        hostile += [client.submit(slow_config(8 + i), f"target-{i}", False, False, api_name="/submit") for i in range(2)]
        ends: list[float] = []  # when each hostile request ended, seconds after the first was sent
        for future in hostile:
            future.add_done_callback(lambda _: ends.append(time.monotonic() - start))
        time.sleep(0.5)  # the hostile requests are in the app now

        light = {
            "job_status": _timed(lambda: client.predict(job_id, api_name="/job_status")),
            "job_config": _timed(lambda: client.predict(job_id, api_name="/job_config")),
            "share": _timed(lambda: client.predict(SMALL_VALID, api_name="/share")),
        }
        still_running = sum(not h.done() for h in hostile)
        valid = _timed(lambda: client.predict(SMALL_VALID, api_name="/validate"))

        for future in hostile:
            with pytest.raises(AppError) as caught:
                future.result(timeout=60)
            assert caught.value.title == "ValidationTimeoutError", caught.value.message
            assert f"longer than the {TIME_LIMIT_S:g}-second limit" in caught.value.message

    for name, (answer, seconds) in light.items():
        assert not isinstance(answer, AppError), (name, answer)
        assert seconds < LIGHT_BOUND_S, (name, seconds)
    assert light["job_status"][0]["status"] == "queued"
    with sqlite3.connect(tmp_path / "data" / "jobs.db") as conn:  # the timed-out submissions queued nothing
        assert conn.execute("select id from jobs").fetchall() == [(job_id,)]
    assert still_running >= 8, "the light requests did not overlap the hostile ones"
    # Validation runs VALIDATE_CONCURRENCY at a time: the last of 8 waits for the rounds before it.
    bound = math.ceil(8 / constants.VALIDATE_CONCURRENCY) * TIME_LIMIT_S + SLACK_S
    assert max(ends) < bound, (ends, bound)
    answer, seconds = valid  # a valid config queued behind the hostile ones still gets its answer
    assert "4 layers" in answer and seconds < bound + TIME_LIMIT_S, (answer, seconds)
    print(f"\nlight: {{{', '.join(f'{k}: {v[1]:.2f}s' for k, v in light.items())}}}; small /validate: {seconds:.2f}s; "
          f"hostile ended at {min(ends):.1f}-{max(ends):.1f}s (bound {bound:.1f}s)")


def test_a_timed_out_call_stops_at_its_next_check() -> None:
    steps: list[int] = []
    ended = threading.Event()

    def slow() -> None:
        try:
            for step in range(1000):
                timeouts.check_deadline("the next step")
                steps.append(step)
                time.sleep(0.02)
        finally:
            ended.set()

    start = time.monotonic()
    with pytest.raises(ValidationTimeoutError, match="took longer than the 0.3-second limit"):
        timeouts.run_limited(slow, 0.3, "a slow check")
    assert time.monotonic() - start < 1.0
    assert ended.wait(1.0), "the abandoned call kept running"
    assert 3 < len(steps) < 60  # it ran until the limit, then stopped at a check (not after 1000 steps)


def test_a_call_within_its_limit_returns_or_raises_its_own_error() -> None:
    assert timeouts.run_limited(lambda: 42, 1.0, "a quick check") == 42
    with pytest.raises(KeyError, match="mine"):
        timeouts.run_limited(lambda: {}["mine"], 1.0, "a failing check")
    timeouts.check_deadline("nothing")  # outside a limited call: no deadline, no error


def test_models_are_read_at_once_each_within_the_callers_deadline() -> None:
    both_started = threading.Barrier(2, timeout=10)  # broken (an error) if the first two ran one after another

    def read(index: int) -> tuple[int, bool]:
        if index < 2:
            both_started.wait()
        return index, timeouts._deadline.get() is not None

    found = timeouts.run_limited(lambda: timeouts.map_models(read, [0, 1, 2], str), 30, "reading three models")
    assert found == [(0, True), (1, True), (2, True)]


def test_of_models_read_at_once_the_first_failure_in_order_is_raised() -> None:
    second_failed = threading.Event()

    def read(index: int) -> int:
        if index == 0:
            assert second_failed.wait(10)
            raise ValueError("the first model's")
        second_failed.set()
        raise KeyError("the second model's")

    with pytest.raises(ValueError, match="the first model's"):
        timeouts.map_models(read, [0, 1], str)


def test_when_every_slot_is_taken_a_new_call_is_refused_in_its_limit(monkeypatch) -> None:
    monkeypatch.setattr(timeouts, "_slots", threading.BoundedSemaphore(1))
    release = threading.Event()
    with pytest.raises(ValidationTimeoutError):
        timeouts.run_limited(lambda: release.wait(5), 0.2, "a stuck check")  # keeps the only slot
    start = time.monotonic()
    with pytest.raises(ValidationTimeoutError, match="busy with other checks"):
        timeouts.run_limited(lambda: 1, 0.3, "another check")
    assert time.monotonic() - start < 1.0
    release.set()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:  # the stuck call gives its slot back when it ends
        try:
            assert timeouts.run_limited(lambda: 7, 0.5, "a later check") == 7
            break
        except ValidationTimeoutError:
            continue
    else:
        raise AssertionError("the slot was never given back")
