"""merger.service, the UI's one door: the pre-flight checklist (each failure with its fix), My merges, cancel."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from merger import constants, service
from merger.config.dump import dump_yaml

TOKEN = "hf_test_alice"


@pytest.fixture(scope="module")
def published(hub, fixture_models_dir: Path, tmp_path_factory) -> None:
    for name in ("mistral-base", "mistral-prose", "qwen2-base"):
        folder = tmp_path_factory.mktemp(name)
        shutil.copytree(fixture_models_dir / name, folder, dirs_exist_ok=True)
        if name == "mistral-base":  # one card with a license, one without
            (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# fixture\n")
        hub.upload_model(folder, f"alice/pf-{name}")  # names of its own: other tests publish the fixtures too


@pytest.fixture
def job_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from cryptography.fernet import Fernet

    data = tmp_path / "data"
    monkeypatch.setattr(constants, "DATA_DIR", data)
    monkeypatch.setattr(constants, "QUEUE_DB", data / "queue.db")
    monkeypatch.setattr(constants, "JOBS_DB", data / "jobs.db")
    monkeypatch.setenv(getattr(constants, "QUEUE_KEY_ENV", "MERGER_QUEUE_KEY"), Fernet.generate_key().decode())
    return data


def ties(base: str = "alice/pf-mistral-base", other: str = "alice/pf-mistral-prose", **extra) -> str:
    return dump_yaml({
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": other, "parameters": {"weight": 1.0, "density": 0.5}}],
        **extra,
    })


def lines(result: service.Preflight) -> dict[str, service.CheckLine]:
    return {line.name: line for line in result.lines}


def test_a_mergeable_config_passes_every_line(hub, published, job_store) -> None:
    result = service.preflight(ties(), TOKEN, "pf-new", False, False)
    found = lines(result)
    assert list(found) == ["config", "models", "compatibility", "target repo", "resources"]
    assert result.ok, result
    # each model with its architecture, parameter count (from the safetensors headers) and license
    assert found["models"].detail.startswith("2 model(s) reachable: `alice/pf-mistral-base` (MistralForCausalLM, ")
    assert "license apache-2.0" in found["models"].detail and "license unknown" in found["models"].detail
    assert found["target repo"].detail == "`alice/pf-new`: new, public"
    # the download is the two fixtures' safetensors payloads, counted from their headers
    from merger.dtypes import DTYPE_SIZES
    from merger.io.resolve import fetch_metadata
    from merger.config.load import load_config

    metas = fetch_metadata(load_config(ties()).referenced_models(), TOKEN)
    payload = sum(t.numel * DTYPE_SIZES[t.dtype] for m in metas.values() for t in m.tensors.values())
    assert f"download {service.checklist._bytes(payload)}" in found["resources"].detail


def test_a_broken_config_names_the_field_and_the_fix(hub, published) -> None:
    result = service.preflight("merge_method: ties\nmodels: []\n", TOKEN, "pf-x", False, False)
    found = lines(result)
    assert not result.ok and not found["config"].ok
    assert found["config"].fix == "fix the field it names in the form or the YAML"
    assert "models" not in found  # nothing to fetch for a config that does not parse


def test_an_unknown_model_is_a_models_line_with_its_fix(hub, published) -> None:
    result = service.preflight(ties(other="alice/not-there"), TOKEN, "pf-x", False, False)
    found = lines(result)
    assert not found["models"].ok and "alice/not-there" in found["models"].detail
    assert "check the model ids in the form" in found["models"].fix
    assert "compatibility" not in found


def test_a_cross_family_merge_fails_compatibility(hub, published) -> None:
    result = service.preflight(ties(other="alice/pf-qwen2-base"), TOKEN, "pf-x", False, False)
    found = lines(result)
    assert found["models"].ok and not found["compatibility"].ok
    assert "the models differ in width" in found["compatibility"].detail
    assert "`alice/pf-qwen2-base` (qwen2, hidden size 128)" in found["compatibility"].detail
    assert found["compatibility"].fix.endswith("in the form")
    assert found["target repo"].ok  # the other lines are still checked


def test_the_target_repo_lines(hub, published, job_store, no_token_env) -> None:
    hub.upload_model(Path(__file__).parent / "data" / "fixtures" / "mistral-base", "alice/pf-taken")
    taken = lines(service.preflight(ties(), TOKEN, "pf-taken", False, False))["target repo"]
    assert not taken.ok and "reuse existing repo" in taken.fix
    reused = lines(service.preflight(ties(), TOKEN, "pf-taken", False, True))["target repo"]
    assert reused.ok and "exists, a new commit will be pushed (reuse)" in reused.detail
    elsewhere = lines(service.preflight(ties(), TOKEN, "bob/pf-x", False, False))["target repo"]
    assert not elsewhere.ok and elsewhere.fix == "choose another repo name"
    unnamed = lines(service.preflight(ties(), TOKEN, " ", False, False))["target repo"]
    assert not unnamed.ok and "type a name in “New model repo”" in unnamed.fix
    signed_out = lines(service.preflight(ties(), None, "pf-x", False, False))["target repo"]
    assert not signed_out.ok and "sign in" in signed_out.fix


def test_resources_fail_when_the_worker_lacks_disk(hub, published, job_store, monkeypatch) -> None:
    import shutil as shell

    real = shell.disk_usage
    monkeypatch.setattr(service.checklist.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    found = lines(service.preflight(ties(), TOKEN, "pf-new", False, False))
    assert not found["resources"].ok and "1.0 KB disk" in found["resources"].detail
    assert "remove models in the form" in found["resources"].fix


def test_my_merges_newest_first_own_jobs_only_and_cancel(hub, job_store) -> None:
    from merger.jobs import queue

    first = queue.submit(ties(), "alice/one", TOKEN, "alice")
    second = queue.submit(ties(), "alice/two", TOKEN, "alice")
    queue.submit(ties(), "bob/other", "hf_test_bob", "bob")
    mine = service.my_jobs(TOKEN)
    assert [j["id"] for j in mine] == [second, first]
    assert [j["repo_id"] for j in mine] == ["alice/two", "alice/one"]
    assert [j["queue_position"] for j in mine] == [2, 1]
    assert service.cancel(first, TOKEN) is True
    mine = service.my_jobs(TOKEN)
    assert [j["status"] for j in mine] == ["queued", "cancelled"]
    assert mine[0]["queue_position"] == 1  # the cancelled job no longer stands in front
    assert service.my_jobs(None) == []


@pytest.fixture
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)



def test_one_form_fetches_and_plans_once_across_validate_preflight_and_submit(hub, published, job_store, monkeypatch) -> None:
    from merger.io import resolve
    from merger.plan import entry

    from merger.config import load

    calls = {"parse": 0, "fetch": 0, "plan": 0}
    real_parse, real_fetch, real_plan = load.load_config, resolve.fetch_metadata, entry.plan_from_metadata

    def parse(*args, **kwargs):
        calls["parse"] += 1
        return real_parse(*args, **kwargs)

    def fetch(*args, **kwargs):
        calls["fetch"] += 1
        return real_fetch(*args, **kwargs)

    def plan(*args, **kwargs):
        calls["plan"] += 1
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(load, "load_config", parse)
    monkeypatch.setattr(resolve, "fetch_metadata", fetch)
    monkeypatch.setattr(entry, "plan_from_metadata", plan)
    text = ties(dtype="float32")  # a text no other test checked: nothing remembered yet
    report = service.validate(text, TOKEN)
    assert report.models == ("alice/pf-mistral-base", "alice/pf-mistral-prose")
    assert service.preflight(text, TOKEN, "pf-once", False, False).ok
    assert service.submit(text, "pf-once", TOKEN, False, False)
    assert calls == {"parse": 1, "fetch": 1, "plan": 1}
    service.validate(text, None)  # another caller (here: signed out) is checked with its own rights
    assert calls == {"parse": 2, "fetch": 2, "plan": 2}


def test_a_multi_stage_config_passes_the_checklist(hub, published, job_store) -> None:
    first = ties()
    text = "name: first\n" + first + "---\n" + dump_yaml({
        "merge_method": "linear",
        "models": [{"model": "first", "parameters": {"weight": 0.5}},
                   {"model": "alice/pf-mistral-base", "parameters": {"weight": 0.5}}],
    })
    found = lines(service.preflight(text, TOKEN, "pf-stages", False, False))
    assert list(found) == ["config", "models", "compatibility", "target repo"]
    assert all(line.ok for line in found.values()), found
    assert "2 stages" in found["compatibility"].detail


def test_on_a_space_the_resolver_reads_only_the_jobs_work_folders(fixture_models_dir, job_store, monkeypatch) -> None:
    """The service refuses local paths on a Space; the resolver itself does too, for any entry point."""
    from merger.config.schema import ModelReference
    from merger.errors import ModelNotFoundError
    from merger.io.resolve import local_path

    monkeypatch.setattr(constants, "ON_SPACE", True)
    outside = fixture_models_dir / "llama-base"
    for spelled_as_a_path in (str(outside), "./llama-base", "~/x", "../../etc"):
        with pytest.raises(ModelNotFoundError, match="local folders are not read here"):
            local_path(ModelReference.parse(spelled_as_a_path))
    monkeypatch.chdir(fixture_models_dir.parent)  # `fixtures/llama-base` is spelled like a Hub id: it is one here
    assert local_path(ModelReference.parse("fixtures/llama-base")) is None
    intermediate = job_store / "work" / "job-1" / "stage-0"
    shutil.copytree(outside, intermediate)
    assert local_path(ModelReference.parse(str(intermediate))) == intermediate.resolve()
    monkeypatch.setattr(constants, "ON_SPACE", False)
    assert local_path(ModelReference.parse("fixtures/llama-base")) == outside.resolve()


def test_an_evaluated_merge_needs_ram_for_its_largest_model_in_float32(hub, published, job_store) -> None:
    from types import SimpleNamespace

    result = service.checked(ties(), TOKEN)
    big = SimpleNamespace(tensors={"w": SimpleNamespace(numel=10**8, dtype="BF16")})  # a parent of 0.1B parameters
    metadata = {**result.metadata, "org/big": big}
    evaluated = service.checklist._resources_line(result.plan, metadata, evaluate=True)
    assert "peak memory ~400.0 MB" in evaluated.detail  # 10^8 parameters in float32, one model at a time
    streamed = service.checklist._resources_line(result.plan, metadata, evaluate=False)
    assert "peak memory ~400.0 MB" not in streamed.detail
