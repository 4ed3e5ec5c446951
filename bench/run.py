"""Benchmark our CLI against mergekit 0.1.5 on the same synthetic models and the same YAML.

    python bench/run.py [--set full|half|both] [--reps 3] [--methods linear,ties,...]
                        [--tools ours,mergekit] [--device cpu|cuda] [--load N]

For each set (bench/make_models.py) and method (bench/configs/), each repetition runs both tools back
to back (their order alternating between repetitions) and then the floor (bench/floor.py), each as a
fresh process: wall time, peak RSS of the process tree (/proc, polled every 10 ms, mapped file pages
included) and the bytes of the written safetensors. Each tool first merges the repo's tiny fixture
models once, untimed, so bytecode caches are warm; inputs are read once before each method's runs so
every run starts from a warm page cache; each output is deleted and the page cache synced before the
next run. Medians over the repetitions go into a table of ratios with PASS/FAIL against the targets,
printed and written to bench/RESULTS.md. mergekit is installed on first use into
bench/work/venv-mergekit; a method our CLI rejects (`merger validate`) is reported as not available.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

import torch

import make_models

BENCH = make_models.BENCH
REPO = BENCH.parent
WORK = make_models.WORK
VENV = WORK / "venv-mergekit"
TOOLS = ("ours", "mergekit")
# The floors: "floor" writes through the page cache as mergekit does; "direct floor" writes around it
# (O_DIRECT) as ours does, and is the one the floor targets are judged against (the stricter here).
FLOORS = {"floor": [], "direct floor": ["--direct"]}
SEED = 0
POLL_S = 0.01
PAGE = os.sysconf("SC_PAGE_SIZE")
GB = 1e9
RSS_LIMIT = 1.5 * GB  # the full set's peak-RSS target; the half set must be within 10% of the full set's
RSS_GROWTH = 0.10
FIXTURES = REPO / "tests" / "data" / "fixtures"
PYCACHE = WORK / "pycache"
# Child processes see no network (the models are local; a Hub lookup must not add timeouts), and write
# their bytecode caches under bench/work (this machine's environment may forbid writing them at all,
# which would make every run compile our package from source while the venv's are precompiled).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPYCACHEPREFIX": str(PYCACHE)}


@dataclass(frozen=True)
class Method:
    """A benchmarked merge.

    Attributes:
        moe: a mergekit-moe config (mergekit-moe instead of mergekit-yaml).
        seeded: pass `--random-seed` to both tools.
        inputs: what the floor reads: (model, tensor-name regex or None for the whole file).
        floor_limit: ours' wall time may be at most this many times the floor's of the same run (the
            floor being what no tool can avoid, the target holds on a slow machine and a fast one alike).
    """

    moe: bool
    seeded: bool
    inputs: tuple[tuple[str, str | None], ...]
    floor_limit: float = 1.3


TWO = (("ft1", None), ("ft2", None))
THREE = (("base", None),) + TWO
METHODS = {  # Method(moe, seeded, inputs, floor_limit); TIES and DARE do the most math per byte
    "linear": Method(False, False, TWO),
    "slerp": Method(False, False, TWO),
    "task_arithmetic": Method(False, False, THREE),
    "ties": Method(False, False, THREE, 2.5),
    "dare_ties": Method(False, True, THREE, 2.5),
    "passthrough": Method(False, False, (("ft1", None),)),
    "moe": Method(True, True, (("ft1", None), ("ft2", r"\.mlp\.")), 1.3),
}


@contextlib.contextmanager
def busy_processes(count: int):
    """`count` processes that each keep one core busy while the block runs (`--load N`): a shared machine,
    where threads that spin or oversubscribe the cores lose time slices to the neighbours."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def render_config(method: str, label: str, models: dict[str, Path], layers: int) -> Path:
    """bench/configs/METHOD.yml with `models` (base, ft1, ft2 -> folder) and the layer counts filled in,
    written to bench/work/configs/LABEL/METHOD.yml."""
    values = {name: str(path) for name, path in models.items()}
    values |= {"layers": layers, "five_eighths": layers * 5 // 8, "three_eighths": layers * 3 // 8}
    text = Template((BENCH / "configs" / f"{method}.yml").read_text()).substitute(values)
    path = WORK / "configs" / label / f"{method}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def set_config(method: str, set_name: str, folder: Path) -> Path:
    """A method's config on one benchmark set, whose models are in `folder` (make_models.ensure_set)."""
    models = {name: folder / name for name in make_models.MODEL_NAMES}
    return render_config(method, set_name, models, make_models.LAYERS[set_name])


def warm_up(tools: list[str], device: str) -> None:
    """Run each tool, untimed, on the repo's tiny fixture models (a linear merge and an MoE), so the
    timed runs find every module's bytecode compiled (in PYCACHE) like an installed tool would."""
    models = {"base": FIXTURES / "mistral-base", "ft1": FIXTURES / "mistral-prose", "ft2": FIXTURES / "mistral-code"}
    for method in ("linear", "moe"):
        config = render_config(method, "warm-up", models, 4)
        for tool in tools:
            out = WORK / "out" / "warm-up"
            log = WORK / "logs" / "warm-up" / f"{method}-{tool}.log"
            _, _, rc = measure(command(tool, method, config, out, device), log)
            if rc != 0:  # the timed runs will report it; the warm-up only warns
                print(f"[warm-up] {tool} fails on the tiny fixture models ({method}): {last_line(log)} [{log}]", flush=True)
            clear(out)


def ensure_mergekit() -> dict:
    """Install mergekit 0.1.5 (over CPU torch 2.13.0) into VENV unless it works already; its install record."""
    record = VENV / "bench-install.json"
    if record.is_file() and all(check_help(tool) for tool in ("mergekit-yaml", "mergekit-moe")):
        return json.loads(record.read_text())
    print(f"[mergekit] installing into {VENV} ...", flush=True)
    shutil.rmtree(VENV, ignore_errors=True)
    log = WORK / "logs" / "mergekit-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as sink:
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install"]
        for step in ([sys.executable, "-m", "venv", str(VENV)], pip + ["torch==2.13.0"], pip + ["mergekit==0.1.5"]):
            # torch first, so that mergekit's torch requirement is already met by the CPU wheel
            if subprocess.run(step, stdout=sink, stderr=subprocess.STDOUT).returncode != 0:
                sys.exit(f"[mergekit] `{' '.join(step)}` failed; see {log}")
    seconds = time.perf_counter() - start
    for tool in ("mergekit-yaml", "mergekit-moe"):
        if not check_help(tool):
            sys.exit(f"[mergekit] `{tool} --help` fails after installing; see {VENV}")
    versions = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    info = {"seconds": round(seconds, 1), "bytes": folder_bytes(VENV), "mergekit": versions[0], "torch": versions[1]}
    record.write_text(json.dumps(info) + "\n")
    print(f"[mergekit] installed in {seconds:.0f} s, {info['bytes'] / GB:.2f} GB", flush=True)
    return info


def check_help(tool: str) -> bool:
    """Whether `tool --help` runs in the mergekit venv."""
    path = VENV / "bin" / tool
    return path.is_file() and subprocess.run([str(path), "--help"], capture_output=True, env=ENV).returncode == 0


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """The total size of the files under `folder` matching `pattern`."""
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file() and not p.is_symlink())


def command(tool: str, method: str, config: Path, out: Path, device: str) -> list[str]:
    """The command line of one merge by `tool`, with each tool's defaults otherwise."""
    seed = ["--random-seed", str(SEED)] if METHODS[method].seeded else []
    if tool == "ours":
        return [sys.executable, "-m", "merger", "run", str(config), str(out), "--device", device, *seed]
    script = "mergekit-moe" if METHODS[method].moe else "mergekit-yaml"
    return [str(VENV / "bin" / script), str(config), str(out), *(["--cuda"] if device == "cuda" else []), *seed]


def process_tree(pid: int) -> list[tuple[int, bool]]:
    """`pid` and its descendants, from /proc/PID/task/TID/children (much cheaper than a full /proc scan),
    each with whether it is a fork that still runs its parent's program (see :func:`tree_rss`)."""
    tree = [(pid, False)]
    for parent, _ in tree:
        try:
            for tid in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    tree += [(int(child), _unexecuted_fork(int(child), parent)) for child in f.read().split()]
        except OSError:  # ended meanwhile
            pass
    return tree


def _unexecuted_fork(child: int, parent: int) -> bool:
    """Whether `child` still runs its parent's program with its parent's command line: a fork before its
    exec (as `ctypes.util.find_library` makes, to run `ldconfig`), or one that works on in the parent's
    program (the MoE's class-settings process). Its pages shared with its parent are the parent's:
    counted whole, an `ldconfig` fork doubled the tree's RSS when sampled in that instant (0.50 GB
    instead of 0.31 GB in some half-set runs)."""
    try:
        return (os.readlink(f"/proc/{child}/exe") == os.readlink(f"/proc/{parent}/exe")
                and Path(f"/proc/{child}/cmdline").read_bytes() == Path(f"/proc/{parent}/cmdline").read_bytes())
    except OSError:  # ended meanwhile
        return True


def tree_rss(pid: int) -> int:
    """The summed RSS (file-mapped pages included) of `pid` and its descendants, in bytes; of a fork
    still running its parent's program, only its private pages (those it shares are counted in the
    parent, once)."""
    total = 0
    for member, fork in process_tree(pid):
        try:
            total += _private_bytes(member) if fork else _rss_bytes(member)
        except OSError:  # ended meanwhile
            pass
    return total


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _private_bytes(pid: int) -> int:
    """The process's pages mapped by it alone (/proc/PID/smaps_rollup's Private_Clean + Private_Dirty)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return 1024 * sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))


def measure(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """Run `cmd` (output to `log`); its wall seconds, peak RSS of its process tree, and exit status."""
    peak, done = 0, threading.Event()

    def sample(pid: int) -> None:
        nonlocal peak
        while not done.wait(POLL_S):
            peak = max(peak, tree_rss(pid))

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=sink, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=sample, args=(proc.pid,))
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    return wall, peak, rc


def last_line(log: Path) -> str:
    """The last non-empty line of a log, for a failure message."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def warm(paths: list[Path]) -> None:
    """Read every byte of `paths` so the timed runs find them in the page cache; then write and delete
    as many bytes as the largest of them, because on this (virtual) machine the first large write after
    a while pays up to twice the system time, which would fall on whichever run comes first."""
    buffer = bytearray(1 << 24)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    scratch = WORK / "out" / "scratch.bin"
    scratch.parent.mkdir(parents=True, exist_ok=True)
    with open(scratch, "wb", buffering=0) as f:
        for _ in range(max(path.stat().st_size for path in paths) // len(buffer)):
            f.write(buffer)
    clear(scratch)


def clear(path: Path) -> None:
    """Delete a previous output and flush dirty pages, so no run pays for another's writeback."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


def ours_rejects(config: Path) -> str | None:
    """Why our CLI rejects `config` (`merger validate`'s message), or None when it accepts it."""
    result = subprocess.run([sys.executable, "-m", "merger", "validate", str(config)], cwd=REPO, env=ENV, capture_output=True, text=True)
    if result.returncode == 0:
        return None
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    return lines[-1][:200] if lines else f"exit status {result.returncode}"


def run_set(set_name: str, methods: list[str], tools: list[str], reps: int, device: str) -> dict:
    """Measure every (method, tool) of one set; {method: {tool: {wall, rss, bytes} lists | {error}}}."""
    models = make_models.ensure_set(set_name)
    out_root, logs = WORK / "out" / set_name, WORK / "logs" / set_name
    configs = {method: set_config(method, set_name, models) for method in methods}
    results: dict = {}
    for method in methods:
        results[method] = {tool: {"wall": [], "rss": [], "bytes": []} for tool in [*tools, *FLOORS]}
        if "ours" in tools and (reason := ours_rejects(configs[method])):
            results[method]["ours"] = {"error": f"not available: {reason}"}
    for rep in range(reps):
        for method in methods:
            spec = METHODS[method]
            inputs = [(models / model / "model.safetensors", regex) for model, regex in spec.inputs]
            warm([path for path, _ in inputs])
            order = tools if rep % 2 == 0 else tools[::-1]
            for tool in order:
                entry = results[method][tool]
                if "error" in entry:
                    continue
                out = out_root / f"{tool}-{method}"
                clear(out)
                log = logs / f"{method}-{tool}-rep{rep}.log"
                wall, rss, rc = measure(command(tool, method, configs[method], out, device), log)
                if rc != 0:
                    results[method][tool] = {"error": f"failed (exit {rc}): {last_line(log)} [{log}]"}
                else:
                    record(entry, wall, rss, folder_bytes(out, "*.safetensors"))
                    print(f"[{set_name} rep {rep + 1}/{reps}] {method:16} {tool:8} {wall:7.2f} s  {rss / GB:5.2f} GB", flush=True)
                clear(out)
            sizes = [results[method][tool]["bytes"][-1] for tool in TOOLS if results[method].get(tool, {}).get("bytes")]
            if sizes:  # the floors write what ours wrote (mergekit's size when ours did not run)
                for floor, flags in FLOORS.items():
                    out = out_root / "floor.bin"
                    cmd = [sys.executable, str(BENCH / "floor.py"), *flags, "--out", str(out), "--out-bytes", str(sizes[0])]
                    cmd += [f"{path}::{regex}" if regex else str(path) for path, regex in inputs]
                    wall, rss, rc = measure(cmd, log := logs / f"{method}-{floor}-rep{rep}.log")
                    if rc != 0:
                        sys.exit(f"[{floor}] failed (exit {rc}): {last_line(log)} [{log}]")
                    record(results[method][floor], wall, rss, sizes[0])
                    print(f"[{set_name} rep {rep + 1}/{reps}] {method:16} {floor:12} {wall:7.2f} s  {rss / GB:5.2f} GB", flush=True)
                    clear(out)
    return results


def record(entry: dict, wall: float, rss: int, size: int) -> None:
    """Append one run's measurements to a (method, tool) entry."""
    entry["wall"].append(wall)
    entry["rss"].append(rss)
    entry["bytes"].append(size)


def median(entry: dict, key: str) -> float | None:
    """The median of one measurement over the repetitions, None when the tool did not run."""
    return statistics.median(entry[key]) if entry.get(key) else None


def peak(entry: dict) -> float | None:
    """The highest peak RSS of the repetitions, None when the tool did not run. A peak is a bound the
    machine must provide: TIES's moves by 15% between runs of either set (0.91-1.05 GB), as its threads
    happen to hold their largest tensors at once or not, so a median of three says as much about when
    they overlapped as about the model's size."""
    return max(entry["rss"]) if entry.get("rss") else None


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("PASS" if ok else "FAIL")


def table(set_name: str, results: dict, all_results: dict) -> list[str]:
    """The markdown table of one set: medians (RSS: the highest peak), ratios and the targets' PASS/FAIL."""
    rows = [
        "| method | ours s | mergekit s | floor s | direct floor s | ours/mergekit | ours/floor | ours/direct floor "
        "| ours RSS GB | mergekit RSS GB | ours out GB | mergekit out GB | faster than mergekit | floor target "
        "| RSS target |",
        "|---|" + "---:|" * 11 + "---|---|---|",
    ]
    notes = []
    for method, entries in results.items():
        spec = METHODS[method]
        wall = {tool: median(entries.get(tool, {}), "wall") for tool in ("ours", "mergekit", *FLOORS)}
        rss = {tool: peak(entries.get(tool, {})) for tool in ("ours", "mergekit")}
        size = {tool: median(entries.get(tool, {}), "bytes") for tool in ("ours", "mergekit")}
        speed = floor = memory = None
        if wall["ours"] and wall["mergekit"]:
            speed = wall["ours"] < wall["mergekit"]
        if wall["ours"] and wall["direct floor"]:
            floor = wall["ours"] / wall["direct floor"] <= spec.floor_limit
        if rss["ours"] and set_name == "full":
            memory = rss["ours"] <= RSS_LIMIT
        elif rss["ours"] and (full := peak(all_results.get("full", {}).get(method, {}).get("ours", {}))):
            memory = abs(rss["ours"] - full) <= RSS_GROWTH * full

        def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
            return "—" if value is None else f"{value / scale:.{digits}f}"

        def ratio(a: float | None, b: float | None) -> str:
            return "—" if not (a and b) else f"{a / b:.3f}"

        rows.append(
            f"| {method} | {fmt(wall['ours'])} | {fmt(wall['mergekit'])} | {fmt(wall['floor'])} "
            f"| {fmt(wall['direct floor'])} | {ratio(wall['ours'], wall['mergekit'])} "
            f"| {ratio(wall['ours'], wall['floor'])} | {ratio(wall['ours'], wall['direct floor'])} "
            f"| {fmt(rss['ours'], GB)} | {fmt(rss['mergekit'], GB)} "
            f"| {fmt(size['ours'], GB, 3)} | {fmt(size['mergekit'], GB, 3)} "
            f"| {verdict(speed)} | ≤{spec.floor_limit:g}× direct floor: {verdict(floor)} "
            f"| {'≤1.5 GB' if set_name == 'full' else '±10% of full'}: {verdict(memory)} |"
        )
        notes += [f"- {method}, {tool}: {entry['error']}" for tool, entry in entries.items() if "error" in entry]
    return rows + ([""] + notes if notes else [])


def engine_state() -> str:
    """The engine's identity: its git commit, whether merger/ has uncommitted changes, and a hash of
    every file under merger/ (which also tells apart two states of uncommitted work)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    digest = hashlib.sha256()
    for path in sorted((REPO / "merger").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "merger") else ""
    return f"git {git('rev-parse', '--short', 'HEAD') or '?'}{dirty}, merger/ sha256 {digest.hexdigest()[:12]}"


def machine() -> list[str]:
    """A description of the machine and software versions, for the report."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {cpu}; {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable); RAM {PAGE * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB",
        f"- OS: {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__} (ours)",
    ]


def report(all_results: dict, args: argparse.Namespace, mergekit: dict | None, engine: tuple[str, str]) -> str:
    """The whole RESULTS.md text; `engine` is engine_state() at the start and at the end of the run."""
    lines = ["# Benchmark: merger vs mergekit 0.1.5", "", "```", "python bench/run.py " + " ".join(sys.argv[1:]), "```", ""]
    lines += machine()
    lines.append(f"- engine: {engine[0]}")
    if engine[1] != engine[0]:
        lines.append(f"- **the engine changed during the run** (at the end: {engine[1]}); these numbers mix versions")
    if mergekit:
        lines.append(
            f"- mergekit {mergekit['mergekit']} (torch {mergekit['torch']}) in bench/work/venv-mergekit: "
            f"installed in {mergekit['seconds']:.0f} s, {mergekit['bytes'] / GB:.2f} GB"
        )
    lines += [f"- device: {args.device}; median of {args.reps} run(s) (peak RSS: the highest), tools interleaved, warm page cache", ""]
    if args.load:
        lines[-1:-1] = [f"- load: {args.load} busy process(es) beside every timed run (tools and floor alike)"]
    for set_name, results in all_results.items():
        params = make_models.parameter_count(set_name)
        lines += [
            f"## {set_name} set: {make_models.LAYERS[set_name]} layers, {params / 1e9:.2f}B parameters, "
            f"{2 * params / GB:.2f} GB per model",
            "",
            *table(set_name, results, all_results),
            "",
        ]
    lines += [
        "Times are wall seconds (process start to exit), medians; RSS is the peak of the summed RSS of the",
        "process tree, mapped input pages included, the highest of the runs; out GB is the written",
        "safetensors. ours/mergekit < 1 means ours is faster (≥8× faster = ratio ≤ 0.125). The floor",
        "starts Python, imports torch and",
        "safetensors, reads every input byte the merge needs once and writes ours' output bytes once:",
        "through the page cache (floor), or around it with O_DIRECT as ours writes (direct floor, the one",
        "the floor targets are judged against). See bench/README.md.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=["full", "half", "both"], default="both")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="N busy processes (one core each) run beside every timed run; results to RESULTS-loadN.md")
    args = parser.parse_args()
    methods, tools = args.methods.split(","), args.tools.split(",")
    if unknown := [m for m in methods if m not in METHODS] + [t for t in tools if t not in TOOLS]:
        parser.error(f"unknown method or tool: {', '.join(unknown)}")
    mergekit = ensure_mergekit() if "mergekit" in tools else None
    sets = ["full", "half"] if args.set == "both" else [args.set]
    engine_start = engine_state()
    warm_up(tools, args.device)
    with busy_processes(args.load):
        all_results = {name: run_set(name, methods, tools, args.reps, args.device) for name in sets}
    suffix = f"-load{args.load}" if args.load else ""
    (WORK / f"results{suffix}.json").write_text(json.dumps(all_results, indent=1) + "\n")
    text = report(all_results, args, mergekit, (engine_start, engine_state()))
    (BENCH / f"RESULTS{suffix}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
