"""Print the sha256 of our CLI's safetensors for every benchmark method, to check that a change to the
engine keeps its outputs byte-identical.

    python bench/hashes.py [--set half|full] [--methods linear,ties,...] [--device cpu|cuda] > hashes.txt

Every method is deterministic here: DARE masks and the MoE gate use `--random-seed 0`. Lines are in
sha256sum format (`HASH  SET/METHOD/FILE`), so two runs compare with `diff`; a method our CLI rejects
prints `not available` instead. The engine's commit and source hash go to stderr. Outputs are written under bench/work/hashes/ and deleted once hashed.
"""

from __future__ import annotations

import argparse
import sys

import make_models
import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=["full", "half"], default="half")
    parser.add_argument("--methods", default=",".join(run.METHODS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    print(f"# engine: {run.engine_state()}", file=sys.stderr)
    models = make_models.ensure_set(args.set)
    for method in args.methods.split(","):
        config = run.set_config(method, args.set, models)
        if reason := run.ours_rejects(config):
            print(f"not available  {args.set}/{method}: {reason}", flush=True)
            continue
        out = run.WORK / "hashes" / args.set / method
        log = run.WORK / "logs" / args.set / f"{method}-hashes.log"
        run.clear(out)
        _, _, rc = run.measure(run.command("ours", method, config, out, args.device), log)
        if rc != 0:
            print(f"failed  {args.set}/{method}: {run.last_line(log)} [{log}]", flush=True)
        for path in sorted(out.glob("*.safetensors")) if rc == 0 else []:
            print(f"{make_models.sha256(path)}  {args.set}/{method}/{path.name}", flush=True)
        run.clear(out)


if __name__ == "__main__":
    main()
