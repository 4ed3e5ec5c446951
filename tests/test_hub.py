"""merger.publish.hub_read and hub_push against the loopback Hub (tests/minihub.py), via conftest's `hub` fixture."""

from __future__ import annotations

import json
import os
import shutil
import struct
import traceback
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.file_download import repo_folder_name

from merger.publish import hub_calls
from merger.errors import ConfigError, HubError, ModelNotFoundError, PushTargetError, UnsafeWeightsError
from merger.publish.hub_push import PushTarget, check_push_target, delete_unpushed_repo, push_folder, whoami
from merger.publish.hub_read import download_model, fetch_metadata, search_models
from merger.config.references import is_hub_id, split_reference
from merger.io.metadata import TensorMeta, read_safetensors_header

LICENSED_README = "---\nlicense: apache-2.0\ntags:\n- fixture\n---\n\n# mistral-base fixture\n"


def _cached_files(repo_id: str) -> set[str]:
    """File names in the HF cache's snapshots of `repo_id` (empty if it was never fetched)."""
    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    return {p.name for p in snapshots.glob("*/*")}


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Write a valid safetensors file of zeros: name -> (dtype, shape)."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        nbytes = sizes[dtype] * (shape[0] * shape[1] if len(shape) == 2 else shape[0])
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))


def _error_text(excinfo: pytest.ExceptionInfo) -> str:
    return "".join(traceback.format_exception(excinfo.value))


# ---------------------------------------------------------------- fixtures: repos on the loopback Hub


@pytest.fixture(scope="module")
def mistral_dir(fixture_models_dir, tmp_path_factory) -> Path:
    """mistral-base plus a licensed README and a stray pickle file that downloads must skip."""
    target = tmp_path_factory.mktemp("mistral") / "mistral-base"
    shutil.copytree(fixture_models_dir / "mistral-base", target)
    target.chmod(0o755)
    (target / "README.md").write_text(LICENSED_README)
    (target / "training_args.bin").write_bytes(b"\x80\x04not really a pickle")
    return target


@pytest.fixture(scope="module")
def mistral_repo(hub, mistral_dir) -> str:
    return hub.upload_model(mistral_dir, "alice/mistral-base")


@pytest.fixture(scope="module")
def pickle_repo(hub, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("pickle-only")
    (folder / "config.json").write_text('{"model_type": "mistral"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04dummy pickle")
    return hub.upload_model(folder, "alice/pickle-only")


@pytest.fixture(scope="module")
def sharded_repo(hub, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("sharded")
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
    _write_safetensors(folder / "model-00001-of-00002.safetensors", {"embed.weight": ("BF16", (16, 8))})
    _write_safetensors(folder / "model-00002-of-00002.safetensors", {"norm.weight": ("F32", (8,))})
    weight_map = {"embed.weight": "model-00001-of-00002.safetensors", "norm.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hub.upload_model(folder, "alice/sharded")


@pytest.fixture
def merged_dir(tmp_path) -> Path:
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mistral"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# merged\n")
    return folder


@pytest.fixture
def offline(monkeypatch):
    """Point huggingface_hub at a port nobody listens on."""
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


# ---------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("org/name@v1.0", ("org/name", "v1.0")), ("org/name", ("org/name", None)), ("name@", ("name", None))],
)
def test_split_reference(reference, expected):
    assert split_reference(reference) == expected


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("org/name", True), ("gpt2", True), ("org/name@abc123", True), ("a/b/c", False), ("./model", False),
     ("org/na--me", False), ("~/models/x", False)],
)
def test_is_hub_id_by_shape(reference, expected):
    assert is_hub_id(reference) is expected


def test_is_hub_id_false_for_existing_local_dir(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") is False
    assert is_hub_id("org/other") is True


# ---------------------------------------------------------------- download_model


def test_download_model_fetches_safetensors_configs_and_card_only(hub, mistral_repo, mistral_dir):
    path = download_model(mistral_repo, token=hub.token)

    assert {p.name for p in path.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json", "README.md",
    }  # training_args.bin and .gitattributes are not in HUB_ALLOW_PATTERNS
    assert (path / "model.safetensors").read_bytes() == (mistral_dir / "model.safetensors").read_bytes()


def test_download_model_works_anonymously_for_public_repo(mistral_repo):
    assert (download_model(mistral_repo) / "config.json").is_file()


def test_download_model_refuses_pickle_only_repo_before_downloading(hub, pickle_repo):
    with pytest.raises(UnsafeWeightsError) as excinfo:
        download_model(pickle_repo, token=hub.token)

    assert "`alice/pickle-only`" in str(excinfo.value)
    assert "pytorch_model.bin" in str(excinfo.value)
    assert _cached_files(pickle_repo) == set()


@pytest.mark.parametrize("reference", ["alice/no-such-model", "alice/mistral-base@no-such-revision"])
def test_download_model_missing_repo_or_revision(hub, mistral_repo, reference):
    with pytest.raises(ModelNotFoundError) as excinfo:
        download_model(reference, token=hub.token)

    message = str(excinfo.value)
    assert f"`{reference}`" in message
    assert "spelling" in message and "revision" in message and "sign in" in message


def test_download_model_private_repo_of_someone_else_is_not_found(hub):
    bob = HfApi(token="hf_test_bob")
    bob.create_repo("bob/secret", private=True)
    bob.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="bob/secret")

    with pytest.raises(ModelNotFoundError, match="private or gated"):
        download_model("bob/secret", token=hub.token)
    assert (download_model("bob/secret", token="hf_test_bob") / "config.json").read_text() == "{}"


def test_download_model_unreachable_hub_is_hub_error(offline):
    with pytest.raises(HubError, match="could not reach the Hub"):
        download_model("alice/mistral-base")


# ---------------------------------------------------------------- fetch_metadata


def test_fetch_metadata_matches_local_header_without_downloading_weights(hub, mistral_dir):
    # A repo of its own, so that no earlier download of the same files is in the cache.
    repo_id = hub.upload_model(mistral_dir, "alice/mistral-metadata")

    meta = fetch_metadata(repo_id, token=hub.token)

    local = read_safetensors_header(mistral_dir / "model.safetensors")
    assert meta.tensors == local
    assert len(meta.tensors) > 10
    assert meta.config == json.loads((mistral_dir / "config.json").read_text())
    assert meta.license == "apache-2.0"
    assert meta.reference == repo_id
    assert _cached_files(repo_id) == {"config.json"}


def test_fetch_metadata_reads_every_shard_of_an_index(hub, sharded_repo):
    meta = fetch_metadata(sharded_repo, token=hub.token)

    assert meta.tensors == {"embed.weight": TensorMeta((16, 8), "BF16"), "norm.weight": TensorMeta((8,), "F32")}
    assert meta.config == {"model_type": "llama", "num_hidden_layers": 1}
    assert meta.license is None  # no README


def test_fetch_metadata_refuses_pickle_only_repo(hub, pickle_repo):
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin"):
        fetch_metadata(pickle_repo, token=hub.token)


def test_fetch_metadata_missing_repo(hub):
    with pytest.raises(ModelNotFoundError, match="`alice/nothing-here`"):
        fetch_metadata("alice/nothing-here", token=hub.token)


def test_fetch_metadata_repo_without_config(hub, tmp_path):
    _write_safetensors(tmp_path / "model.safetensors", {"w": ("F32", (2,))})
    repo_id = hub.upload_model(tmp_path, "alice/no-config")

    with pytest.raises(ModelNotFoundError, match="no `config.json`"):
        fetch_metadata(repo_id, token=hub.token)


# ---------------------------------------------------------------- push_folder


def test_push_folder_creates_repo_with_files(hub, merged_dir):
    url = push_folder(merged_dir, "alice/merged-one", token=hub.token, commit_message="Merge it")

    assert url == f"{hub.url}/alice/merged-one"
    api = HfApi(token=hub.token)
    files = set(api.list_repo_files("alice/merged-one"))
    assert files == {".gitattributes", "config.json", "model.safetensors", "README.md"}
    commits = hub.store.repos[("model", "alice/merged-one")]["commits"]
    assert [c["title"] for c in commits] == ["initial commit", "Merge it"]  # one commit for all files


def test_push_folder_bare_name_goes_to_token_user(hub, merged_dir):
    url = push_folder(merged_dir, "merged-bare", token=hub.token, private=True)

    assert url == f"{hub.url}/alice/merged-bare"
    assert HfApi(token=hub.token).model_info("alice/merged-bare").private is True


def test_push_folder_failed_upload_deletes_the_repo_it_created(hub, merged_dir, monkeypatch):
    monkeypatch.setattr(hub.store, "fail_commits", 422)

    with pytest.raises(HubError, match="pushing to `alice/merged-failed`") as excinfo:
        push_folder(merged_dir, "alice/merged-failed", token=hub.token)

    assert "HTTP 422" in str(excinfo.value)
    assert str(excinfo.value).endswith("Nothing was pushed: the repo `alice/merged-failed` this job created was deleted.")
    assert HfApi(token=hub.token).repo_exists("alice/merged-failed") is False


def test_push_folder_hub_gone_mid_upload_deletes_the_repo_it_created(hub, merged_dir, monkeypatch):
    monkeypatch.setattr(hub.store, "fail_commits", "drop")  # the commit request gets no answer at all
    noted = []

    with pytest.raises(HubError) as excinfo:
        push_folder(merged_dir, "merged-dropped", token=hub.token, before_create=noted.append)

    message = str(excinfo.value)
    assert message.startswith("pushing to `alice/merged-dropped` failed: could not reach the Hub")
    assert message.endswith("Nothing was pushed: the repo `alice/merged-dropped` this job created was deleted.")
    assert noted == ["alice/merged-dropped"]  # told before the repo existed
    assert ("model", "alice/merged-dropped") not in hub.store.repos


def test_push_folder_failed_upload_keeps_an_existing_repo(hub, merged_dir, monkeypatch):
    push_folder(merged_dir, "alice/merged-existing", token=hub.token)
    before = list(hub.store.repos[("model", "alice/merged-existing")]["commits"])
    monkeypatch.setattr(hub.store, "fail_commits", 422)

    with pytest.raises(HubError) as excinfo:
        push_folder(merged_dir, "alice/merged-existing", token=hub.token, reuse_repo=True)

    assert str(excinfo.value).endswith(
        "Nothing was pushed: the repo `alice/merged-existing` existed before and was left unchanged."
    )
    assert hub.store.repos[("model", "alice/merged-existing")]["commits"] == before


def test_push_folder_interrupted_upload_deletes_the_repo(hub, merged_dir, monkeypatch):
    def cancelled(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HfApi, "upload_folder", cancelled)

    with pytest.raises(KeyboardInterrupt):
        push_folder(merged_dir, "alice/merged-cancelled", token=hub.token)

    assert HfApi(token=hub.token).repo_exists("alice/merged-cancelled") is False


@pytest.mark.parametrize("repo_id", ["alice/bad name", "a/b/c", "alice/double--dash", ""])
def test_push_folder_bad_repo_id_is_config_error(hub, merged_dir, repo_id):
    with pytest.raises(ConfigError) as excinfo:
        push_folder(merged_dir, repo_id, token=hub.token)

    assert "`repo`" in str(excinfo.value)
    assert f"`{repo_id}`" in str(excinfo.value)


def test_push_folder_to_another_users_namespace_is_refused(hub, merged_dir):
    with pytest.raises(PushTargetError) as excinfo:
        push_folder(merged_dir, "bob/not-yours", token=hub.token)

    assert str(excinfo.value) == (
        "`repo`: you may not create or push to `bob/not-yours`: `bob` is neither your account (`alice`) nor an "
        "organization you belong to; push to `alice/...` or to an organization where you have the write or admin role"
    )
    assert hub.token not in _error_text(excinfo)
    assert HfApi(token="hf_test_bob").repo_exists("bob/not-yours") is False


# ---------------------------------------------------------------- push targets, checked before a merge


@pytest.fixture
def orgs(hub, monkeypatch):
    monkeypatch.setattr(hub.store, "orgs", {"acme": {"alice": "write"}, "readers": {"alice": "read", "bob": "admin"}})


def test_push_target_own_namespace_and_org_with_write_role(hub, orgs, merged_dir):
    assert check_push_target("fresh-one", hub.token) == PushTarget("alice/fresh-one", exists=False, private=False)
    assert check_push_target("acme/fresh", hub.token, private=True) == PushTarget("acme/fresh", False, True)
    url = push_folder(merged_dir, "acme/merged-org", token=hub.token)
    assert url == f"{hub.url}/acme/merged-org"
    assert hub.store.repos[("model", "acme/merged-org")]["owner"] == "acme"


def test_push_target_org_with_read_role_is_refused_before_anything(hub, orgs, merged_dir):
    with pytest.raises(PushTargetError, match="your role in the organization `readers` is `read`"):
        push_folder(merged_dir, "readers/nope", token=hub.token)
    assert ("model", "readers/nope") not in hub.store.repos


def test_push_target_existing_repo_needs_reuse_and_keeps_its_visibility(hub, merged_dir):
    api = HfApi(token=hub.token)
    api.create_repo("alice/public-target")
    api.create_repo("alice/private-target", private=True)

    with pytest.raises(PushTargetError) as excinfo:
        check_push_target("alice/public-target", hub.token)
    assert "`alice/public-target` already exists; choose a new name, or allow reusing it (`--reuse-repo`" in str(
        excinfo.value
    )
    with pytest.raises(PushTargetError) as excinfo:
        check_push_target("alice/public-target", hub.token, private=True, reuse_repo=True)
    assert str(excinfo.value).startswith(
        "`repo`: `alice/public-target` exists and is public, but a private repo was asked for"
    )

    assert check_push_target("public-target", hub.token, reuse_repo=True) == PushTarget(
        "alice/public-target", exists=True, private=False
    )
    push_folder(merged_dir, "alice/public-target", token=hub.token, reuse_repo=True)
    push_folder(merged_dir, "alice/private-target", token=hub.token, reuse_repo=True)  # private=False changes nothing
    assert api.model_info("alice/public-target").private is False
    assert api.model_info("alice/private-target").private is True
    assert "config.json" in api.list_repo_files("alice/private-target")


def test_delete_unpushed_repo_deletes_an_empty_repo_and_keeps_a_pushed_one(hub, merged_dir):
    api = HfApi(token=hub.token)
    api.create_repo("alice/left-empty")
    push_folder(merged_dir, "alice/left-full", token=hub.token)

    assert delete_unpushed_repo("alice/left-empty", hub.token) == (
        True, "Nothing was pushed: the repo `alice/left-empty` this job created was deleted."
    )
    assert api.repo_exists("alice/left-empty") is False
    assert delete_unpushed_repo("alice/left-full", hub.token) == (
        True, "The repo `alice/left-full` holds the uploaded files; it was kept."
    )
    assert delete_unpushed_repo("alice/never-made", hub.token) == (
        True, "The repo `alice/never-made` was never created; nothing is on the Hub."
    )


# ---------------------------------------------------------------- whoami, tokens


def test_whoami(hub):
    assert whoami(hub.token) == "alice"
    assert whoami("hf_test_bob") == "bob"


BAD_TOKEN = "hf_" + "Secret" * 6


def test_rejected_token_never_appears_in_errors(hub, mistral_repo, merged_dir):
    for call in (
        lambda: whoami(BAD_TOKEN),
        lambda: download_model(mistral_repo, token=BAD_TOKEN),
        lambda: fetch_metadata(mistral_repo, token=BAD_TOKEN),
        lambda: push_folder(merged_dir, "alice/with-bad-token", token=BAD_TOKEN),
        lambda: push_folder(merged_dir, "bare-with-bad-token", token=BAD_TOKEN),
    ):
        with pytest.raises(HubError, match="token was rejected; sign in again") as excinfo:
            call()
        assert BAD_TOKEN not in _error_text(excinfo)


def test_scrub_removes_given_and_token_shaped_strings():
    text = hub_calls._scrub(f"failed for {BAD_TOKEN} and hf_{'A1' * 15} but hf_hub_download stays", "tok-en")
    assert text == "failed for *** and *** but hf_hub_download stays"


# ---------------------------------------------------------------- search_models


def test_search_models_by_substring(hub, mistral_repo, sharded_repo):
    found = set(search_models("MISTRAL-b", token=hub.token))  # other tests may publish more `*mistral-base`s
    assert "alice/mistral-base" in found and all("mistral-b" in name.lower() for name in found)
    assert "alice/mistral-prose" not in found
    assert "alice/sharded" in search_models("shard")
    assert len(search_models("alice", limit=2)) == 2
    assert search_models("  ") == []


def test_search_models_unreachable_hub_gives_no_suggestions(monkeypatch):
    # Patched rather than pointed at a dead port: list_models retries connection errors for ~20 s.
    def unreachable(*args, **kwargs):
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(HfApi, "list_models", unreachable)
    assert search_models("mistral") == []


def test_search_models_hub_error_gives_no_suggestions(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", constants.ENDPOINT + "/not-an-api")  # every call is a 404
    assert search_models("mistral") == []


def test_environment_points_huggingface_hub_at_the_loopback_hub(hub):
    assert constants.ENDPOINT == hub.url
    assert Path(constants.HF_HUB_CACHE).is_relative_to(Path(constants.HF_HOME))
    assert constants.HF_HOME == os.environ["HF_HOME"] != str(Path.home() / ".cache" / "huggingface")
    assert constants.HF_HUB_DISABLE_XET is True
    assert "HF_TOKEN" not in os.environ


# ---------------------------------------------------------------- the CLI checks the push target before merging


@pytest.fixture
def cli_config(tmp_path, fixture_models_dir) -> Path:
    path = tmp_path / "linear.yml"
    path.write_text(
        "merge_method: linear\nmodels:\n"
        + "".join(f"  - model: {fixture_models_dir / n}\n    parameters: {{weight: 0.5}}\n" for n in ("mistral-base", "mistral-code"))
    )
    return path


@pytest.mark.parametrize(
    ("target", "flags", "words"),
    [
        ("bob/cli-theirs", [], "you may not create or push to `bob/cli-theirs`"),
        ("alice/cli-existing", [], "`alice/cli-existing` already exists; choose a new name, or allow reusing it (`--reuse-repo`"),
        ("alice/cli-existing", ["--private", "--reuse-repo"], "`alice/cli-existing` exists and is public, but a private repo"),
        ("alice/cli bad", [], "`alice/cli bad` is not a valid Hub repo id"),
    ],
)
def test_cli_refuses_a_bad_push_target_before_merging(hub, cli_config, tmp_path, capsys, monkeypatch, target, flags, words):
    from merger.cli import main

    HfApi(token=hub.token).create_repo("alice/cli-existing", exist_ok=True)
    monkeypatch.setenv("HF_TOKEN", hub.token)

    code = main(["run", str(cli_config), str(tmp_path / "out"), "--device", "cpu", "--push-to", target, *flags])

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before the merge wrote anything


def test_cli_reuse_repo_pushes_a_new_commit(hub, cli_config, tmp_path, capsys, monkeypatch):
    from merger.cli import main

    HfApi(token=hub.token).create_repo("alice/cli-reused", exist_ok=True)
    monkeypatch.setenv("HF_TOKEN", hub.token)

    code = main(["run", str(cli_config), str(tmp_path / "out"), "--device", "cpu", "--push-to", "cli-reused", "--reuse-repo"])

    out = capsys.readouterr().out
    assert code == 0 and out.strip().endswith(f"pushed to {hub.url}/alice/cli-reused")
    files = hub.store.repos[("model", "alice/cli-reused")]["commits"][-1]["files"]
    assert {"config.json", "model.safetensors.index.json", "mergekit_config.yml"} <= set(files)
    assert HfApi(token=hub.token).model_info("alice/cli-reused").private is False
