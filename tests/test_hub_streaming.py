"""Streaming from and to the Hub: weights read by byte ranges (only what the plan needs, retried on faults),
shards uploaded as they are written (bounded disk, one commit, no repo left by a failure)."""

from __future__ import annotations

import hashlib
import http.client
import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import RepositoryNotFoundError

from merger.engine import run_merge
from merger.errors import HubError, MergeCancelled, ModelNotFoundError
from merger.execute import executor
from merger.publish import hub_ranges, hub_read
from merger.publish.hub_read import HEADER_FIRST_READ, fetch_metadata
from merger.publish.stream_push import StreamPush
from minihub import Fault

WEIGHTS = "model.safetensors"
MODELS = ("llama-base", "llama-prose", "llama-code")


@pytest.fixture(scope="module")
def repos(hub, fixture_models_dir: Path) -> dict[str, str]:
    """The three llama fixtures on the loopback Hub, under names no other test downloads."""
    return {name: hub.upload_model(fixture_models_dir / name, f"alice/stream-{name}") for name in MODELS}


def served(hub, repo_id: str) -> int:
    return hub.store.served.get(f"{repo_id}/{WEIGHTS}", 0)


def header(path: Path) -> tuple[int, dict]:
    """A safetensors file's data offset and header, parsed here by hand (independent of the engine)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8 : 8 + length])
    entries.pop("__metadata__", None)
    return 8 + length, entries


SHARD = 400_000  # bytes per output shard: eight shards of the fixtures


def linear_yaml(models: dict[str, str]) -> str:
    return f"""
merge_method: linear
models:
  - {{model: {models['llama-base']}, parameters: {{weight: 0.2}}}}
  - {{model: {models['llama-prose']}, parameters: {{weight: 0.5}}}}
  - {{model: {models['llama-code']}, parameters: {{weight: 0.3}}}}
dtype: bfloat16
"""


def output_bytes(folder: Path) -> dict[str, bytes]:
    """The files a merge writes whose bytes do not name the inputs (the card and the config copy do)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in ("README.md", "mergekit_config.yml")}


def local_names(fixture_models_dir: Path) -> dict[str, str]:
    return {name: str(fixture_models_dir / name) for name in MODELS}


@pytest.fixture(scope="module")
def reference(fixture_models_dir: Path, tmp_path_factory) -> Path:
    """The linear merge of the local fixture folders: what every streamed merge must equal, byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_merge(linear_yaml(local_names(fixture_models_dir)), out, device="cpu", shard_size=SHARD)
    return out


def test_merge_read_by_ranges_equals_the_local_merge_and_downloads_no_weights(hub, repos, reference, fixture_models_dir, tmp_path):
    before = {repo: served(hub, repo) for repo in repos.values()}
    run_merge(linear_yaml(repos), tmp_path / "hub", device="cpu", shard_size=SHARD, token=hub.token)

    assert output_bytes(tmp_path / "hub") == output_bytes(reference)
    for name, repo in repos.items():
        assert try_to_load_from_cache(repo, WEIGHTS) is None  # nothing written to the HF cache
        size = (fixture_models_dir / name / WEIGHTS).stat().st_size
        start, entries = header(fixture_models_dir / name / WEIGHTS)
        tensor_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
        # the header's first read, then every tensor once (a linear merge needs all of them), nothing more
        assert served(hub, repo) - before[repo] == min(HEADER_FIRST_READ, size) + tensor_bytes


def test_frankenmerge_downloads_only_the_layers_it_uses(hub, repos, fixture_models_dir, tmp_path):
    text = """
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [4, 6]}}]
dtype: bfloat16
"""
    prose, code = repos["llama-prose"], repos["llama-code"]
    before = {repo: served(hub, repo) for repo in (prose, code)}
    run_merge(text.format(a=prose, b=code), tmp_path / "hub", device="cpu", token=hub.token)
    run_merge(text.format(a=fixture_models_dir / "llama-prose", b=fixture_models_dir / "llama-code"), tmp_path / "local",
              device="cpu")
    assert output_bytes(tmp_path / "hub") == output_bytes(tmp_path / "local")

    # What mergekit's passthrough reads: the first slice's model gives the embeddings, the last one's
    # the final norm and the LM head; each gives its own layers.
    wanted = {
        prose: lambda n: n == "model.embed_tokens.weight" or n.startswith(("model.layers.0.", "model.layers.1.")),
        code: lambda n: n in ("model.norm.weight", "lm_head.weight") or n.startswith(("model.layers.4.", "model.layers.5.")),
    }
    for repo, name in ((prose, "llama-prose"), (code, "llama-code")):
        path = fixture_models_dir / name / WEIGHTS
        _, entries = header(path)
        needed = sum(e["data_offsets"][1] - e["data_offsets"][0] for n, e in entries.items() if wanted[repo](n))
        assert served(hub, repo) - before[repo] == HEADER_FIRST_READ + needed
        assert needed < 0.6 * path.stat().st_size


def test_dropped_connections_and_wrong_ranges_are_retried(hub, repos, reference, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hub_ranges, "BACKOFF_S", 0.01)
    faults = [Fault("drop", 70_000, min_start=9), Fault("short", 4096, min_start=9), Fault("drop", 0, min_start=9),
              Fault("whole", 0, min_start=9), Fault("long", 1000, min_start=9)]
    hub.store.faults[:] = faults
    try:
        run_merge(linear_yaml(repos), tmp_path / "hub", device="cpu", shard_size=SHARD, token=hub.token)
    finally:
        hub.store.faults.clear()
    assert all(f.fired for f in faults)
    assert output_bytes(tmp_path / "hub") == output_bytes(reference)
    retried = [r.getMessage() for r in caplog.records if "retrying bytes" in r.getMessage()]
    assert any("instead of a range" in m for m in retried) and any("Content-Range announced" in m for m in retried)


def test_ranges_redirected_to_another_host_are_read_without_the_token(hub, repos, reference, tmp_path, monkeypatch):
    # As the Hub sends a large file from its CDN: the same loopback server, named `localhost` (another host).
    monkeypatch.setattr(hub_ranges, "try_to_load_from_cache", lambda *args, **kwargs: None)  # all from the Hub
    monkeypatch.setattr(hub.store, "cdn", hub.url.replace("127.0.0.1", "localhost"))
    monkeypatch.setattr(hub.store, "cdn_authorizations", [])
    run_merge(linear_yaml(repos), tmp_path / "hub", device="cpu", shard_size=SHARD, token=hub.token)
    assert output_bytes(tmp_path / "hub") == output_bytes(reference)
    assert len(hub.store.cdn_authorizations) > 3 and set(hub.store.cdn_authorizations) == {None}


class _ForwardProxy(BaseHTTPRequestHandler):
    """A plain HTTP forward proxy: each request (an absolute URL) is sent on to its host; `seen` lists them."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        target = urlsplit(self.path)
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        upstream.request("GET", target.path, headers={k: v for k, v in self.headers.items() if k.lower() != "proxy-connection"})
        answer = upstream.getresponse()
        body = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        upstream.close()

    def log_message(self, *args) -> None:
        pass


def test_ranges_go_through_the_proxy_the_environment_names(hub, repos, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_ranges, "try_to_load_from_cache", lambda *args, **kwargs: None)  # all from the Hub
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), type("Proxy", (_ForwardProxy,), {"seen": []}))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        run_merge(linear_yaml(repos), tmp_path / "hub", device="cpu", shard_size=SHARD, token=hub.token)
    finally:
        proxy.shutdown()
    assert output_bytes(tmp_path / "hub") == output_bytes(reference)
    # huggingface_hub's own client read the proxy variables when it was made (before this test); the ranges' pool
    # reads them at each request: every model's weights came through the proxy.
    weights = {urlsplit(url).path.split("/resolve/")[0].strip("/") for url in proxy.RequestHandlerClass.seen
               if url.endswith(WEIGHTS)}
    assert weights == set(repos.values())


def test_a_range_refused_after_the_metadata_names_the_model_and_what_to_do(hub, repos, fixture_models_dir):
    # The repo became gated after its metadata was read: bob has not accepted its terms.
    repo = hub.upload_model(fixture_models_dir / "llama-base", "alice/stream-gated-later")
    source = hub_ranges.HubWeights(fetch_metadata(repo, token=hub.token).hub, "hf_test_bob", repo)
    hub.store.repos[("model", repo)]["gated"] = "manual"
    view = memoryview(bytearray(source.tensors["model.norm.weight"].nbytes))
    with pytest.raises(ModelNotFoundError, match=r"alice/stream-gated-later` is gated: accept its terms"):
        source.read_into("model.norm.weight", view)


def test_a_range_that_keeps_failing_is_a_hub_error_naming_the_model(hub, repos, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_ranges, "BACKOFF_S", 0.0)
    hub.store.faults[:] = [Fault("drop", 0, r"llama-base/", min_start=9) for _ in range(hub_ranges.RETRIES + 1)]
    try:
        with pytest.raises(HubError, match=r"stream-llama-.*after 5 retries"):
            run_merge(linear_yaml(repos), tmp_path / "hub", device="cpu", token=hub.token)
    finally:
        hub.store.faults.clear()
    assert not (tmp_path / "hub").exists()


def test_weights_in_the_local_cache_are_read_from_there(hub, repos, fixture_models_dir, tmp_path):
    text = f"merge_method: linear\nmodels:\n  - model: {repos['llama-base']}\n    parameters: {{weight: 1.0}}\ndtype: bfloat16\n"
    hf_hub_download(repos["llama-base"], WEIGHTS)
    before = served(hub, repos["llama-base"])
    run_merge(text, tmp_path / "out", device="cpu", token=hub.token)
    assert served(hub, repos["llama-base"]) - before == HEADER_FIRST_READ  # the metadata's header read only
    local = text.replace(repos["llama-base"], str(fixture_models_dir / "llama-base"))
    run_merge(local, tmp_path / "local", device="cpu")
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "local")


class _DiskWatch:
    """The most `*.safetensors` files seen in a folder's subfolders (the merge's staging folder and the
    push's upload folder), sampled every millisecond and at every shard."""

    def __init__(self, parent: Path):
        self.parent, self.peak, self._stop = parent, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        try:
            n = sum(1 for _ in self.parent.glob("*/*.safetensors"))
        except FileNotFoundError:  # a subfolder removed while it was listed (a push's upload folder): next sample
            return 0
        self.peak = max(self.peak, n)
        return n

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.count()

    def __enter__(self) -> "_DiskWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_shards_are_uploaded_as_they_are_written_then_one_commit(hub, reference, fixture_models_dir, tmp_path):
    local = linear_yaml(local_names(fixture_models_dir))
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(shards) >= 8
    hub.store.up_bps = 4_000_000  # uploads slower than the merge: the writer must wait for them
    try:
        work = tmp_path / "work"
        with _DiskWatch(work) as watch, StreamPush("stream-out", hub.token) as push:
            def on_shard(path: Path, sha256: bytes | None) -> None:
                assert sha256 == hashlib.sha256(path.read_bytes()).digest()  # hashed as written
                watch.count()
                push(path, sha256)

            run_merge(local, work / "out", device="cpu", shard_size=SHARD, on_shard=on_shard)
            url = push.commit(work / "out")
    finally:
        hub.store.up_bps = None
    assert url.endswith("/alice/stream-out")
    assert 2 <= watch.peak <= 3  # the shard being written and at most two waiting or uploading
    assert [p.name for p in work.iterdir()] == ["out"] and not list(work.glob("out/*.safetensors"))  # each deleted once uploaded
    api = HfApi(token=hub.token)
    assert len(api.list_repo_commits("alice/stream-out")) == 2  # the repo's creation and the one commit
    assert set(api.list_repo_files("alice/stream-out")) >= {*shards, "model.safetensors.index.json", "config.json"}
    for name in shards:
        assert Path(hf_hub_download("alice/stream-out", name)).read_bytes() == (reference / name).read_bytes()


def _repo_exists(hub, repo_id: str) -> bool:
    try:
        HfApi(token=hub.token).repo_info(repo_id)
    except RepositoryNotFoundError:
        return False
    return True


def test_a_merge_stopped_after_some_uploads_leaves_no_repo(hub, fixture_models_dir, tmp_path):
    created, done = [], []
    with pytest.raises(MergeCancelled):
        with StreamPush("stream-cancelled", hub.token, before_create=created.append) as push:
            run_merge(linear_yaml(local_names(fixture_models_dir)), tmp_path / "out", device="cpu", shard_size=SHARD,
                      on_shard=push, progress=lambda f, _: done.append(f), should_cancel=lambda: bool(done) and done[-1] > 0.6)
    assert created == ["alice/stream-cancelled"]  # the repo was made (for the first shard), then deleted
    assert not _repo_exists(hub, "alice/stream-cancelled")


def test_a_failed_commit_leaves_no_repo_and_says_so(hub, fixture_models_dir, tmp_path):
    hub.store.fail_commits = 500
    try:
        with pytest.raises(HubError, match="this job created was deleted"):
            with StreamPush("stream-refused", hub.token) as push:
                run_merge(linear_yaml(local_names(fixture_models_dir)), tmp_path / "out", device="cpu",
                          shard_size=SHARD, on_shard=push)
                push.commit(tmp_path / "out")
    finally:
        hub.store.fail_commits = None
    assert not _repo_exists(hub, "alice/stream-refused")


def test_with_an_evaluation_the_shards_are_handed_on_after_it(fixture_models_dir, reference, tmp_path):
    events: list[tuple[str, object]] = []

    def evaluate(staged: Path, parents: dict[str, Path]) -> str:
        events.append(("evaluated", sorted(p.name for p in staged.glob("*.safetensors"))))
        return "| metric | value |\n|---|---|\n| bits/token | 1.0 |\n"

    def on_shard(path: Path, sha256: bytes | None) -> None:
        events.append(("shard", path.read_bytes() == (reference / path.name).read_bytes(), sha256))

    run_merge(linear_yaml(local_names(fixture_models_dir)), tmp_path / "out", device="cpu",
              shard_size=SHARD, evaluate=evaluate, on_shard=on_shard)
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert events == [("evaluated", shards)] + [("shard", True, None)] * len(shards)  # not hashed after the evaluation


def test_a_sharded_hub_model_is_read_across_its_files(hub, reference, tmp_path):
    # The reference output is itself a sharded model (eight files and an index): merge it from the Hub.
    repo = hub.upload_model(reference, "alice/stream-sharded")
    text = "merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: 1.0}}\ndtype: bfloat16\n"
    run_merge(text.format(m=repo), tmp_path / "hub", device="cpu", shard_size=SHARD, token=hub.token)
    assert output_bytes(tmp_path / "hub") == output_bytes(reference)  # weight 1.0 in bfloat16: the same bytes
    for name in (p.name for p in reference.glob("*.safetensors")):
        size = (reference / name).stat().st_size
        start, _ = header(reference / name)
        assert hub.store.served[f"{repo}/{name}"] == min(HEADER_FIRST_READ, size) + size - start


def test_the_preflight_counts_only_the_bytes_a_frankenmerge_reads(fixture_models_dir, monkeypatch):
    from merger import constants, service
    from merger.config.load import load_config
    from merger.plan.entry import plan_config

    prose = fixture_models_dir / "llama-prose"
    text = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {prose}, layer_range: [0, 2]}}]\ndtype: bfloat16\n"
    line = service.checklist._resources_line(*plan_config(load_config(text), None), evaluate=False)
    _, entries = header(prose / WEIGHTS)
    unused = ("model.layers.2.", "model.layers.3.", "model.layers.4.", "model.layers.5.")
    needed = sum(e["data_offsets"][1] - e["data_offsets"][0] for n, e in entries.items() if not n.startswith(unused))
    shown = service.checklist._bytes(needed)
    assert f"download {shown}, output {shown} ({shown} on disk" in line.detail
    monkeypatch.setattr(constants, "DEFAULT_SHARD_SIZE", 1000)  # shards this small: only those in flight on disk
    streamed = service.checklist._resources_line(*plan_config(load_config(text), None), evaluate=False)
    assert f"({service.checklist._bytes(3 * 1000)} on disk" in streamed.detail  # the one written + 2 uploading
    reviewed = service.checklist._resources_line(*plan_config(load_config(text), None), evaluate=False, review=True)
    assert f"({shown} on disk" in reviewed.detail  # a merge waiting for review is kept whole
    evaluated = service.checklist._resources_line(*plan_config(load_config(text), None))  # the parents run whole
    everything = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
    assert f"download {service.checklist._bytes(everything)}, output {shown}" in evaluated.detail


def test_small_groups_and_layers_read_twice_give_the_local_bytes(hub, repos, fixture_models_dir, tmp_path, monkeypatch):
    # Groups of ~200 kB, at most two ahead: the fetcher waits for the reads; layers 2-3 are read twice.
    monkeypatch.setattr(hub_ranges, "GROUP_BYTES", 200_000)
    monkeypatch.setattr(hub_ranges, "AHEAD_BYTES", 400_000)
    text = """
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 4]}}]
  - sources: [{{model: {a}, layer_range: [2, 6]}}]
dtype: bfloat16
"""
    repo = repos["llama-code"]
    before = served(hub, repo)
    run_merge(text.format(a=repo), tmp_path / "hub", device="cpu", token=hub.token)
    run_merge(text.format(a=fixture_models_dir / "llama-code"), tmp_path / "local", device="cpu")
    assert output_bytes(tmp_path / "hub") == output_bytes(tmp_path / "local")
    start, entries = header(fixture_models_dir / "llama-code" / WEIGHTS)
    twice = sum(e["data_offsets"][1] - e["data_offsets"][0] for n, e in entries.items()
                if n.startswith(("model.layers.2.", "model.layers.3.")))
    size = (fixture_models_dir / "llama-code" / WEIGHTS).stat().st_size
    assert served(hub, repo) - before == HEADER_FIRST_READ + (size - start) + twice  # every tensor once, 2-3 again


def test_tensors_merged_in_pieces_from_the_hub_give_the_local_bytes_and_are_fetched_once(
        hub, repos, reference, fixture_models_dir, tmp_path, monkeypatch):
    # Pieces of 10k entries (the embeddings in 53), in groups smaller than the embeddings (fetched alone).
    monkeypatch.setattr(executor, "PIECE", 10_000)
    monkeypatch.setattr(hub_ranges, "GROUP_BYTES", 200_000)
    monkeypatch.setattr(hub_ranges, "AHEAD_BYTES", 400_000)
    monkeypatch.setattr(hub_ranges, "try_to_load_from_cache", lambda *args, **kwargs: None)  # all from the Hub
    parts, read_part_into = [], hub_ranges.HubWeights.read_part_into
    monkeypatch.setattr(hub_ranges.HubWeights, "read_part_into",
                        lambda self, name, start, view: parts.append((name, start)) or read_part_into(self, name, start, view))
    before = {repo: served(hub, repo) for repo in repos.values()}
    run_merge(linear_yaml(repos), tmp_path / "hub", device="cpu", shard_size=SHARD, token=hub.token)
    assert output_bytes(tmp_path / "hub") == output_bytes(reference)
    assert sum(name == "model.embed_tokens.weight" for name, _ in parts) == 3 * 53  # 524,288 entries, 10k a piece
    for name, repo in repos.items():
        _, entries = header(fixture_models_dir / name / WEIGHTS)
        tensor_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
        assert served(hub, repo) - before[repo] == HEADER_FIRST_READ + tensor_bytes


def test_a_slerp_from_the_hub_stays_whole_and_is_fetched_once(hub, repos, fixture_models_dir, tmp_path, monkeypatch):
    """Local SLERP inputs go in pieces, their angle from the inputs read once more (the page cache); from
    the Hub, that would fetch every byte twice: the tensors stay whole there, each byte fetched once."""
    monkeypatch.setattr(executor, "PIECE", 10_000)
    monkeypatch.setattr(hub_ranges, "try_to_load_from_cache", lambda *args, **kwargs: None)  # all from the Hub
    names = ("llama-prose", "llama-code")

    def slerp(models: dict[str, str]) -> str:
        return (f"merge_method: slerp\nbase_model: {models[names[0]]}\nmodels:\n  - model: {models[names[0]]}\n"
                f"  - model: {models[names[1]]}\nparameters: {{t: 0.4}}\n")

    run_merge(slerp(local_names(fixture_models_dir)), tmp_path / "local", device="cpu", shard_size=SHARD)
    before = {name: served(hub, repos[name]) for name in names}
    run_merge(slerp(repos), tmp_path / "hub", device="cpu", shard_size=SHARD, token=hub.token)
    assert output_bytes(tmp_path / "hub") == output_bytes(tmp_path / "local")
    for name in names:
        _, entries = header(fixture_models_dir / name / WEIGHTS)
        tensor_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
        assert served(hub, repos[name]) - before[name] == HEADER_FIRST_READ + tensor_bytes


def test_a_part_of_a_tensor_is_read_while_the_rest_of_it_is_still_coming(hub, repos, fixture_models_dir, monkeypatch):
    repo, name = repos["llama-base"], "model.embed_tokens.weight"
    monkeypatch.setattr(hub_ranges, "try_to_load_from_cache", lambda *args, **kwargs: None)  # all from the Hub
    source = hub_ranges.HubWeights(fetch_metadata(repo, token=hub.token).hub, hub.token, repo)
    nbytes, half = source.tensors[name].nbytes, source.tensors[name].nbytes // 2
    rest_may_come, requests = threading.Event(), []
    request = hub_ranges.HubWeights._request

    def first_half_then_wait(self, file, start, view, arrived):
        requests.append((start, len(view)))
        if len(requests) == 1:  # the first answer is short: the fetch asks for the rest next
            return request(self, file, start, view[:half], arrived)
        assert rest_may_come.wait(30)
        return request(self, file, start, view, arrived)

    monkeypatch.setattr(hub_ranges.HubWeights, "_request", first_half_then_wait)
    start, entries = header(fixture_models_dir / "llama-base" / WEIGHTS)
    stored = (fixture_models_dir / "llama-base" / WEIGHTS).read_bytes()[start + entries[name]["data_offsets"][0]:][:nbytes]
    first, second = bytearray(half), bytearray(nbytes - half)
    source.expect([name])
    try:
        reader = threading.Thread(target=source.read_part_into, args=(name, 0, memoryview(first)))
        reader.start()
        reader.join(30)
        assert not reader.is_alive()  # read while the rest could not come
        rest_may_come.set()
        source.read_part_into(name, half, memoryview(second))
    finally:
        rest_may_come.set()
        source.close()
    assert bytes(first) + bytes(second) == stored
    assert requests == [(requests[0][0], nbytes), (requests[0][0] + half, nbytes - half)]


def test_a_model_read_later_is_fetched_once_the_reads_come_near_it(hub, repos, tmp_path, monkeypatch):
    # No lead: the second slice's model is told its reads only when the reader reaches them, so every
    # range of the first model is answered before the second model's first.
    monkeypatch.setattr(executor, "SOURCE_LEAD", 0)
    prose, code = repos["llama-prose"], repos["llama-code"]
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {prose}, layer_range: [0, 2]}}]
  - sources: [{{model: {code}, layer_range: [4, 6]}}]
dtype: bfloat16
"""
    hub.store.ranges.clear()
    run_merge(text, tmp_path / "hub", device="cpu", token=hub.token)
    weights = [repo for repo, path, start, _ in hub.store.ranges if path == WEIGHTS and start > 0]  # the headers start at 0
    assert weights == sorted(weights, key=[prose, code].index) and set(weights) == {prose, code}


def test_a_failure_to_download_an_inputs_other_files_beside_the_merge_is_the_runs_error(hub, repos, tmp_path, monkeypatch):
    # A Hub input's configs and tokenizer are downloaded beside the merge: their failure stops it.
    download = hub_read.download_model

    def no_other_files(reference, token=None, weights=True):
        if not weights:
            raise HubError(f"reading model `{reference}` failed: the Hub answered 503")
        return download(reference, token, weights)

    monkeypatch.setattr(hub_read, "download_model", no_other_files)
    with pytest.raises(HubError, match=r"answered 503"):
        run_merge(linear_yaml(repos), tmp_path / "hub", device="cpu", shard_size=SHARD, token=hub.token)
    assert not (tmp_path / "hub").exists() and list(tmp_path.iterdir()) == []
