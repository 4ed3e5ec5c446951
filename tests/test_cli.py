"""The command line: one-line errors with exit status 2 for a person's usual mistakes, and the happy path."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from merger.cli import main, parse_size

ROOT = Path(__file__).parents[1]


@pytest.fixture
def slerp_config(tmp_path: Path) -> Path:
    text = (ROOT / "templates/examples/fixture-slerp.yaml").read_text()
    path = tmp_path / "slerp.yml"
    path.write_text(text.replace("tests/data/fixtures", str(ROOT / "tests/data/fixtures")))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_the_model_and_says_so(capsys, slerp_config: Path, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "run", str(slerp_config), str(tmp_path / "out"), "--device", "cpu", "--shard-size", "1MB")
    assert code == 0 and "4 layers, 1,192,800 parameters" in out
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 2.4 MB of tensors in 1 MB shards


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--device", "gpu"], ["`--device gpu` is not a device", "cuda"]),
        (["--private"], ["--private", "--push-to"]),
    ],
)
def test_flag_mistakes_are_one_line_errors(capsys, slerp_config: Path, tmp_path: Path, extra, words) -> None:
    code, _, err = run(capsys, "run", str(slerp_config), str(tmp_path / "out"), *extra)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_or_holds_other_files_is_refused(capsys, slerp_config: Path, tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("hi")
    code, _, err = run(capsys, "run", str(slerp_config), str(file))
    assert code == 2 and "is a file" in err
    folder = tmp_path / "earlier"
    assert run(capsys, "run", str(slerp_config), str(folder))[0] == 0
    (folder / "my-eval-results.txt").write_text("keep me")
    code, _, err = run(capsys, "run", str(slerp_config), str(folder))
    assert code == 2 and "my-eval-results.txt" in err
    assert (folder / "my-eval-results.txt").read_text() == "keep me"


def test_an_earlier_output_is_replaced(capsys, slerp_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(capsys, "run", str(slerp_config), str(out), "--shard-size", "1MB")[0] == 0
    assert run(capsys, "run", str(slerp_config), str(out))[0] == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5GB", 15 * 10**8)])
def test_shard_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "1..5GB", ".GB", "5XB", "-1GB"])
def test_bad_shard_sizes_are_refused(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="positive size"):
        parse_size(text)


def test_validate_reports_a_misspelt_parameter(capsys, tmp_path: Path) -> None:
    fx = ROOT / "tests/data/fixtures"
    config = tmp_path / "typo.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {fx / 'mistral-prose'}\n    parameters: {{weigth: 1}}\n"
                      f"  - model: {fx / 'mistral-code'}\n    parameters: {{weight: 1}}\n")
    code, _, err = run(capsys, "validate", str(config))
    assert code == 2 and "did you mean `weight`" in err and err.count("\n") == 1


def test_density_outside_zero_one_is_refused(capsys, tmp_path: Path) -> None:
    fx = ROOT / "tests/data/fixtures"
    config = tmp_path / "dens.yml"
    config.write_text(f"merge_method: dare_ties\nbase_model: {fx / 'mistral-base'}\nmodels:\n"
                      f"  - model: {fx / 'mistral-prose'}\n    parameters: {{weight: 1, density: 1.5}}\n")
    code, _, err = run(capsys, "validate", str(config))
    assert code == 2 and "`models[0].parameters.density`" in err and "1.5" in err and "from 0 to 1" in err


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_config_file_that_cannot_be_read_is_one_line(capsys, tmp_path: Path, command: str) -> None:
    import os

    unreadable = tmp_path / "locked.yml"
    unreadable.write_text("merge_method: linear\n")
    unreadable.chmod(0)
    # /proc/self/mem is a file no one can read from its start (an I/O error, for root too)
    cases = {tmp_path / "missing.yml": "does not exist", tmp_path: "is a folder",
             Path("/proc/self/mem"): "cannot be read ("}
    if not os.access(unreadable, os.R_OK):  # root reads any file: permission is not denied there
        cases[unreadable] = "cannot be read (Permission denied)"
    for path, words in cases.items():
        args = [command, str(path)] + ([str(tmp_path / "out"), "--device", "cpu"] if command == "run" else [])
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: MergerError: config file `") and words in err, err
        assert not (tmp_path / "out").exists()


def test_the_command_line_starts_without_the_hub_client() -> None:
    """huggingface_hub's client module (`hf_api`, through its card module too) takes a quarter of a second
    to import, and the Hub ranges' HTTP stack (urllib3, httpcore2's trust store) 0.1 s: a merge of local
    folders never needs them, so the CLI imports them only at its first Hub call, and the engine renders
    the card beside the merge (docs/decisions.md, "Starting and ending the CLI")."""
    probe = ("import sys, merger.cli, merger.engine\n"
             "print(sorted(m for m in sys.modules if m.startswith(('huggingface_hub.', 'urllib3', 'httpcore2', 'merger.publish.'))))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout
    assert "huggingface_hub.errors" in loaded and "merger.publish.hub_read" in loaded  # the probe sees them at all
    assert "huggingface_hub.hf_api" not in loaded and "huggingface_hub.repocard'" not in loaded
    assert not any(name in loaded for name in ("'urllib3", "'httpcore2", "merger.publish.hub_ranges", "merger.publish.range_http"))


def test_python_m_merger_runs_the_work_with_the_collector_on_and_the_imports_frozen() -> None:
    # The entry point turns the collector off while importing (merger/__main__.py); a launcher that
    # forgot to turn it back on would leak every reference cycle of the merge.
    probe = (
        "import gc, runpy, sys\n"
        "import merger.cli\n"
        "merger.cli._validate = lambda args: print(gc.isenabled(), gc.get_freeze_count())\n"
        "sys.argv = ['merger', 'validate', 'README.md']\n"
        "runpy.run_module('merger', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    enabled, frozen = done.stdout.split()
    assert enabled == "True"
    assert int(frozen) > 100_000  # torch's and the CLI's objects, out of the collector's reach
    assert gc.isenabled() and gc.get_freeze_count() == 0  # importing merger.cli here froze nothing
