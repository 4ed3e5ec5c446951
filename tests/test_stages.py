"""Multi-stage configs (mergekit-multi): stages run in order in one job, the same bytes as by hand."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from merger.cli import main
from merger.engine import run_merge
from merger.errors import MultiDocumentError, StageError
from merger.config.parse import MAX_STAGES
from merger.stages import split_stages
from merger.validate import validate_config


def stage_one(fx: Path) -> str:
    return (f"merge_method: slerp\nbase_model: {fx / 'mistral-prose'}\nmodels:\n  - model: {fx / 'mistral-prose'}\n"
            f"  - model: {fx / 'mistral-code'}\nparameters: {{t: 0.4}}\ndtype: bfloat16\n")


def stage_two(fx: Path, mid: str) -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {fx / 'mistral-base'}\nmodels:\n"
            f"  - model: {mid}\n    parameters: {{weight: 0.8}}\ndtype: bfloat16\n")


def two_stages(fx: Path) -> str:
    return f"# two stages\nname: mid\n{stage_one(fx)}---\nname: final\n{stage_two(fx, 'mid')}"


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(out.glob("*.safetensors")) + [out / "config.json"]:
        h.update(path.read_bytes())
    return h.hexdigest()


def test_two_stages_equal_running_them_by_hand(fixture_models_dir: Path, tmp_path: Path) -> None:
    fx = fixture_models_dir
    run_merge(stage_one(fx), tmp_path / "by-hand-mid", device="cpu")
    run_merge(stage_two(fx, str(tmp_path / "by-hand-mid")), tmp_path / "by-hand", device="cpu")
    text = two_stages(fx)
    (tmp_path / ".out.stages-999999999" / "stage-0").mkdir(parents=True)  # left by a killed run: removed
    result = run_merge(text, tmp_path / "out", device="cpu")
    assert digest(tmp_path / "out") == digest(tmp_path / "by-hand")
    assert digest(tmp_path / "out") != digest(tmp_path / "by-hand-mid")
    assert result.method == "task_arithmetic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by-hand", "by-hand-mid", "out"]  # intermediates gone
    card = (tmp_path / "out" / "README.md").read_text()
    assert stage_one(fx).strip() in card and stage_two(fx, "mid").strip() in card and "name: mid" in card
    assert ".stages-" not in card and "2-stage" in card
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == text


def test_validate_plans_each_stage_from_the_earlier_stages_plan(fixture_models_dir: Path) -> None:
    report = validate_config(two_stages(fixture_models_dir))
    assert report.method == "task_arithmetic" and report.num_layers == 4
    assert set(report.models) == {str(fixture_models_dir / n) for n in ("mistral-base", "mistral-prose", "mistral-code")}
    assert report.stages == 2
    assert report.summary().startswith("2 stages over 3 model(s), the last: Task Arithmetic -> ")
    # a later stage is checked against the earlier stage's planned shapes: a passthrough of layers 2..6
    # of `mid` (4 layers) is out of range
    bad = two_stages(fixture_models_dir).split("---")[0] + (
        "---\nmerge_method: passthrough\nslices:\n  - sources: [{model: mid, layer_range: [2, 6]}]\n")
    with pytest.raises(Exception, match="layer_range"):
        validate_config(bad)


def test_a_broken_later_stage_stops_the_job_before_any_stage_runs(fixture_models_dir: Path, tmp_path: Path) -> None:
    bad = two_stages(fixture_models_dir).split("---")[0] + (
        "---\nmerge_method: passthrough\nslices:\n  - sources: [{model: mid, layer_range: [2, 6]}]\n")
    with pytest.raises(Exception, match="layer_range"):
        run_merge(bad, tmp_path / "out", device="cpu")
    assert list(tmp_path.iterdir()) == []  # no intermediate, no work folder, no output


def test_cli_runs_and_validates_a_multi_stage_file(fixture_models_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "multi.yaml"
    config.write_text(two_stages(fixture_models_dir))
    assert main(["validate", str(config)]) == 0
    assert main(["run", str(config), str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("text, match", [
    ("merge_method: linear\n---\nname: b\nmerge_method: linear\n", "no `name:`"),
    ("name: a\nmerge_method: linear\n---\nname: a\nmerge_method: linear\n", "used twice"),
    ("name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\nname: b\nmerge_method: linear\n", "later one"),
    ("name: a\nmerge_method: linear\nbase_model: a\n---\nmerge_method: linear\n", "later one"),
    ("name: [x]\nmerge_method: linear\n---\nmerge_method: linear\n", "short text"),
])
def test_inconsistent_stages_are_named(text: str, match: str) -> None:
    with pytest.raises(StageError, match=match):
        split_stages(text)


def test_stage_count_is_limited() -> None:
    one = "name: s{i}\nmerge_method: linear\nmodels: [{{model: org/m}}]\n"
    split_stages("---\n".join(one.format(i=i) for i in range(MAX_STAGES)))
    with pytest.raises(MultiDocumentError, match=str(MAX_STAGES)):
        split_stages("---\n".join(one.format(i=i) for i in range(MAX_STAGES + 1)))
