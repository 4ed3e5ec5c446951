"""Streaming from and to a throttled loopback Hub: wall time from start to commit, against downloading
everything first and against the network floor. Not a test.

The loopback Hub (tests/minihub.py, its own process) serves the benchmark models (bench/make_models.py)
with its bandwidth capped (default 200 MB/s down, 100 MB/s up, shared by all connections). For each
method, two modes run in fresh processes, each with an empty HF cache:

- stream: the worker's way: weights read by byte ranges (only what the plan needs), each shard uploaded
  while the next is merged (StreamPush), one commit;
- download: every input downloaded whole (snapshot_download), merged from the local folders, the output
  folder pushed as one commit (upload_folder).

The network floor is max(bytes served / down rate, bytes received / up rate) of the stream run: the
bytes the plan needs in, and the output out. The Hub keeps its files in /dev/shm when it has room (a
remote Hub's storage costs the worker nothing; this VM's buffered disk writes would cost its cores
8-16 s per GB), and the CPU seconds of the worker and of the Hub process are reported per stream run.
`--modes stream` runs the stream mode alone (no table is written then). Peak disk is sampled every 20 ms over the run's HF cache
and work folder; peak RSS is the process's own (ru_maxrss). Output shards are `--shard-mb` MB (the
Hub's 5 GB shards scaled to the models). The passthrough here is a two-model frankenmerge (the first
half of ft1's layers, the second half of ft2's), so that it uses only part of each input.

    python bench/hub_stream.py [--set half|full] [--methods linear,ties,passthrough,moe] [--down-mbps 200] [--up-mbps 100]

Results are printed and written into bench/RESULTS.md, in the section "Streaming from and to the Hub"
(replaced on each run; bench/run.py rewrites the file: run this after it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from string import Template

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work" / "hub_stream"
RESULTS = BENCH / "RESULTS.md"
TOKEN, USER = "hf_bench_token", "bench"
SECTION = "## Streaming from and to the Hub"
PASSTHROUGH = """merge_method: passthrough
slices:
  - sources: [{model: ${ft1}, layer_range: [0, ${half}]}]
  - sources: [{model: ${ft2}, layer_range: [${half}, ${layers}]}]
dtype: bfloat16
"""
METHODS = ("linear", "ties", "passthrough", "moe")


def template(method: str) -> str:
    return PASSTHROUGH if method == "passthrough" else (BENCH / "configs" / f"{method}.yml").read_text()


def config_text(method: str, models: dict[str, str], layers: int) -> str:
    """The benchmark's YAML for `method`, with `models` (role -> Hub id or folder) filled in."""
    return Template(template(method)).safe_substitute(models, layers=layers, half=layers // 2)


# ---------------------------------------------------------------- one run (a child process)


def _tree_bytes(folders: list[Path]) -> int:
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass  # deleted while walking
    return total


def child(mode: str, method: str, set_name: str, layers: int, shard_mb: int) -> None:
    """Run one merge from the Hub to the Hub in `mode`; print `RESULT {json}`."""
    from merger.engine import run_merge
    from merger.publish.hub_push import push_folder
    from merger.publish.hub_read import download_model
    from merger.publish.stream_push import StreamPush

    work = Path(tempfile.mkdtemp(prefix=f"{method}-{mode}-", dir=WORK / "runs"))
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _tree_bytes([work, Path(os.environ["HF_HOME"])]))

    threading.Thread(target=watch, daemon=True).start()
    hub_ids = {role: f"{USER}/{set_name}-{role}" for role in ("base", "ft1", "ft2")}
    repo = f"{USER}/{method}-{mode}-{uuid.uuid4().hex[:8]}"
    out, shard_size = work / "out", shard_mb * 10**6
    started = time.monotonic()
    if mode == "stream":
        with StreamPush(repo, TOKEN) as push:
            run_merge(config_text(method, hub_ids, layers), out, device="cpu", token=TOKEN, shard_size=shard_size,
                      on_shard=push)
            push.commit(out)
    else:
        used = [role for role in hub_ids if "${" + role + "}" in template(method)]
        folders = {role: str(download_model(hub_ids[role], token=TOKEN)) for role in used}
        run_merge(config_text(method, folders, layers), out, device="cpu", shard_size=shard_size)
        push_folder(out, repo, TOKEN)
    wall = time.monotonic() - started
    stop.set()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"wall_s": wall, "rss": usage.ru_maxrss * 1024, "disk": peak[0], "user_s": usage.ru_utime, "sys_s": usage.ru_stime}
    print("RESULT " + json.dumps(result), flush=True)
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the driver


def hub_folder() -> Path:
    """Where the loopback Hub keeps its repos: in memory (/dev/shm) when it has room, as a remote Hub's
    storage costs the worker's machine nothing; on this VM a buffered write of 1 GB to its disk costs
    8-16 s of system time, which the Hub process would take from the merge's two cores."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 8 * 10**9:
        return shm / "merger-bench-hub"
    return WORK / "hub"


def start_hub(hub_dir: Path) -> tuple[subprocess.Popen, str]:
    shutil.rmtree(hub_dir, ignore_errors=True)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "minihub.py"), "--port", "0", "--data", str(hub_dir), "--token",
         f"{TOKEN}={USER}"], stdout=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    match = re.match(r"LISTENING (\S+)", line)
    if match is None:
        process.kill()
        raise SystemExit(f"minihub did not start: {line!r}")
    return process, match[1]


def hub_request(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read() or b"{}")


def child_env(url: str, hf_home: Path) -> dict:
    return dict(os.environ, HF_ENDPOINT=url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN,
                HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def upload_inputs(url: str, set_name: str) -> None:
    """The set's three models as `bench/SET-ROLE` repos (unthrottled)."""
    code = (
        "import sys; from huggingface_hub import HfApi\n"
        "api = HfApi()\n"
        "for role in ('base', 'ft1', 'ft2'):\n"
        f"    repo = '{USER}/{set_name}-' + role\n"
        "    api.create_repo(repo, exist_ok=True)\n"
        f"    api.upload_folder(folder_path='{BENCH}/work/models/{set_name}/' + role, repo_id=repo)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=child_env(url, WORK / "hf-upload"), check=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(url: str, hub_pid: int, mode: str, method: str, args: argparse.Namespace, layers: int) -> dict:
    hf_home = WORK / "hf-home"
    shutil.rmtree(hf_home, ignore_errors=True)
    os.sync()  # no run pays for the previous one's writeback
    before, hub_cpu = hub_request(url, "/_minihub/stats"), cpu_seconds(hub_pid)
    command = [sys.executable, __file__, "--child", mode, method, "--set", args.set, "--shard-mb", str(args.shard_mb)]
    done = subprocess.run(command, env=child_env(url, hf_home), capture_output=True, text=True)
    after = hub_request(url, "/_minihub/stats")
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{method} {mode} failed:\n{done.stderr[-3000:]}")
    result = json.loads(line[7:])
    result.update(down=after["served"] - before["served"], up=after["received"] - before["received"],
                  hub_cpu_s=cpu_seconds(hub_pid) - hub_cpu)
    shutil.rmtree(hf_home, ignore_errors=True)
    return result


def forget_outputs(hub_dir: Path, inputs: set[str]) -> None:
    """Delete the loopback Hub's LFS objects other than the inputs', so that the next run uploads its
    output again (the Hub skips objects it has, and both modes' outputs are the same bytes)."""
    for path in (hub_dir / "lfs").iterdir():
        if path.name not in inputs:
            path.unlink()


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Loopback Hub throttled to {args.down_mbps} MB/s down, {args.up_mbps} MB/s up; {args.set} set; "
        f"{args.shard_mb} MB shards; wall time from start to commit (one run each).",
        "",
        "| method | in GB | out GB | floor s | stream s | stream/floor | download-all s | download/stream | "
        "stream disk GB | download disk GB | stream RSS GB | download RSS GB | stream CPU s (worker / Hub) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, d = r["stream"], r["download"]
        floor = max(s["down"] / (args.down_mbps * 1e6), s["up"] / (args.up_mbps * 1e6))
        lines.append(
            f"| {r['method']} | {s['down'] / 1e9:.2f} | {s['up'] / 1e9:.2f} | {floor:.1f} | {s['wall_s']:.1f} | "
            f"{s['wall_s'] / floor:.2f} | {d['wall_s']:.1f} | {d['wall_s'] / s['wall_s']:.2f} | {s['disk'] / 1e9:.2f} | "
            f"{d['disk'] / 1e9:.2f} | {s['rss'] / 2**30:.2f} | {d['rss'] / 2**30:.2f} | "
            f"{s['user_s'] + s['sys_s']:.1f} / {s['hub_cpu_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def record(text: str, args: argparse.Namespace) -> None:
    import platform

    section = (
        f"{SECTION}\n\n```\npython bench/hub_stream.py --set {args.set} --methods {args.methods} "
        f"--down-mbps {args.down_mbps} --up-mbps {args.up_mbps} --shard-mb {args.shard_mb}\n```\n\n"
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; {os.cpu_count()} logical cores; "
        f"load average (1 min) at the end {os.getloadavg()[0]:.1f}; Python {platform.python_version()}\n"
        "- in/out: bytes the loopback Hub sent/received in the stream run (headers, weights, the output and "
        "its commit); floor: whichever of in/down and out/up is longer\n\n" + text
    )
    old = RESULTS.read_text() if RESULTS.exists() else ""
    kept = old.split(SECTION)[0].rstrip() if SECTION in old else old.rstrip()
    RESULTS.write_text((kept + "\n\n" if kept else "") + section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", choices=("half", "full"), default="half")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--down-mbps", type=int, default=200)
    parser.add_argument("--up-mbps", type=int, default=100)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--modes", default="stream,download", help="stream, download or both (the table needs both)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH))
    from make_models import LAYERS

    layers = LAYERS[args.set]
    if args.child:
        child(args.child[0], args.child[1], args.set, layers, args.shard_mb)
        return
    subprocess.run([sys.executable, str(BENCH / "make_models.py"), "--set", args.set], check=True)
    (WORK / "runs").mkdir(parents=True, exist_ok=True)
    hub_dir = hub_folder()  # chosen once: its free space changes as the Hub fills it
    hub, url = start_hub(hub_dir)
    try:
        upload_inputs(url, args.set)
        inputs = {p.name for p in (hub_dir / "lfs").iterdir()}
        hub_request(url, "/_minihub/throttle", {"down_bps": args.down_mbps * 10**6, "up_bps": args.up_mbps * 10**6})
        rows = []
        for method in args.methods.split(","):
            row = {"method": method}
            for mode in args.modes.split(","):
                row[mode] = run_one(url, hub.pid, mode, method, args, layers)
                forget_outputs(hub_dir, inputs)
                print(method, mode, json.dumps(row[mode]), flush=True)
            rows.append(row)
    finally:
        hub.terminate()
        hub.wait()
        shutil.rmtree(hub_dir, ignore_errors=True)
    if args.modes != "stream,download":
        return
    text = table(rows, args)
    print(text)
    record(text, args)


if __name__ == "__main__":
    main()
