"""The command line: `python -m merger run CONFIG OUT`, `validate CONFIG`, `extract-lora FINETUNE BASE OUT --rank R`,
`eval MODEL...` and `suggest BASE FT...`.

Importing this module imports no torch: `run` reads the config first and, for an MoE, forks the process
that runs its output's class settings (:class:`SettingsProcess`) before torch is imported, so that the
child's imports run on the core this process's imports leave idle (docs/decisions.md, "MoE outputs keep
what the base computes"). Every command then imports the engine (:func:`_import_work`).
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import sys
from contextlib import nullcontext
from pathlib import Path

from huggingface_hub import get_token
from tqdm import tqdm

from merger.config.load import load_config
from merger.config.parse import read_config_file
from merger.config.schema import AnyConfig, MoEConfig
from merger.errors import MergerError, excerpt
from merger.evaluate.flags import add_commands, add_eval_flags
from merger.plan.settings_process import SettingsProcess
from merger.stages import is_multi_stage

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """`5GB` -> 5_000_000_000 bytes (decimal units as on the Hub; `GiB` etc. binary)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()]) if match and match.group(2).upper() in SIZE_UNITS else 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"`--shard-size {text}`: give a positive size like 5GB, 500MB or 2GiB")
    return size


def build_parser() -> argparse.ArgumentParser:
    """The `run` and `validate` subcommands and their flags."""
    parser = argparse.ArgumentParser(prog="python -m merger", description="Merge language models (mergekit YAML).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="merge the models of CONFIG into the folder OUT")
    run.add_argument("config", type=Path, help="a mergekit or mergekit-moe YAML config")
    run.add_argument("out", type=Path, help="output folder (created; replaced if it holds an earlier merge)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    run.add_argument("--shard-size", type=parse_size, default="5GB", help="safetensors shard size (default 5GB)")
    run.add_argument("--random-seed", type=int, default=None, help="seed for DARE/DELLA masks and random gates")
    run.add_argument("--push-to", metavar="REPO", help="push the result to this Hub repo (token from HF_TOKEN or `hf auth login`)")
    run.add_argument("--private", action="store_true", help="create the pushed repo as private")
    run.add_argument("--reuse-repo", action="store_true",
                     help="push to the --push-to repo even if it exists (a new commit; its visibility is kept)")
    run.add_argument("--eval", action="store_true", help="evaluate the merge against its parents before it is moved "
                     "into place (table printed and written into the card); see `eval` for the flags below")
    add_eval_flags(run, device=False)  # `run --device` serves both
    validate = commands.add_parser("validate", help="check CONFIG against the models' metadata, without downloading weights")
    validate.add_argument("config", type=Path)
    validate.add_argument("--report", action="store_true", help="also read the weights (streaming) and report task "
                          "vector norms, cosines and sign conflicts per layer, with warnings")
    extract = commands.add_parser("extract-lora", help="write a PEFT LoRA adapter of FINETUNE − BASE to the folder OUT")
    extract.add_argument("finetune", help="the fine-tuned model (Hub id or folder)")
    extract.add_argument("base", help="its base model (Hub id or folder)")
    extract.add_argument("out", type=Path, help="adapter folder (new, or empty)")
    target = extract.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=int, help="the rank of every matrix's LoRA (at most the matrix's own)")
    target.add_argument("--energy", type=float, help="the share of each change's energy kept, e.g. 0.9 (ranks vary)")
    add_commands(commands)
    return parser


def _run(args: argparse.Namespace, freeze_imports: bool) -> None:
    """`run`: the config is read and parsed before torch is imported, and an MoE's settings process forked."""
    text = _read_config(args.config)
    config = None if is_multi_stage(text) else load_config(text)  # a multi-stage config: run_merge reads it
    early = isinstance(config, MoEConfig) and not args.eval  # an evaluation settles while planning (run_merge)
    with SettingsProcess.start() if early else nullcontext() as settings_process:
        _import_work(freeze_imports)
        _merge(args, text, config, settings_process)


def _import_work(freeze_imports: bool) -> None:
    """Import the engine (torch with it) and the evaluation's commands; with `freeze_imports` (see
    :func:`main`), freeze the objects the imports made and turn the collector back on."""
    import merger.engine  # noqa: F401
    import merger.evaluate.cli  # noqa: F401

    if freeze_imports:
        gc.freeze()
        gc.enable()


def _merge(args: argparse.Namespace, text: str, config: AnyConfig | None,
           settings_process: SettingsProcess | None) -> None:
    """`run`'s merge (and push), once the engine is imported: `config` is `text` parsed (None for a
    multi-stage config), `settings_process` the MoE's (:func:`_run`)."""
    from merger.engine import run_merge
    from merger.evaluate.cli import merge_evaluator

    token = get_token()
    if args.private and not args.push_to:
        raise MergerError("`--private` applies to the pushed repo: add `--push-to REPO`, or drop `--private`")
    if args.reuse_repo and not args.push_to:
        raise MergerError("`--reuse-repo` applies to the pushed repo: add `--push-to REPO`, or drop `--reuse-repo`")
    if args.push_to and not token:
        raise MergerError("`--push-to` needs a Hub token: set HF_TOKEN or run `hf auth login`")
    if args.push_to:
        from merger.publish.hub_push import check_push_target

        # Before the merge: a target the user may not write to must not cost a whole merge.
        target = check_push_target(args.push_to, token, private=args.private, reuse_repo=args.reuse_repo)
        args.push_to = target.repo_id
    bars: list[tqdm] = []  # made at the first tensor, so a config error prints no empty bar

    def progress(fraction: float, name: str) -> None:
        if not bars:
            bars.append(tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}"))
        bars[0].n = round(100 * fraction, 2)
        bars[0].set_postfix_str(name, refresh=False)
        bars[0].refresh()

    evaluate = merge_evaluator(args, token, args.push_to or args.out.name) if args.eval else None
    try:
        result = run_merge(text, args.out, device=args.device, token=token, shard_size=args.shard_size,
                           title=args.push_to or None, seed=args.random_seed, progress=progress, evaluate=evaluate,
                           config=config, settings_process=settings_process)
    finally:
        for bar in bars:
            bar.close()
    print(f"wrote {result.out_dir}: {result.num_layers} layers, {result.parameter_count:,} parameters "
          f"in {result.seconds:.1f}s")
    if args.push_to:
        from merger.publish.hub_push import push_folder

        url = push_folder(args.out, args.push_to, token, private=args.private, reuse_repo=args.reuse_repo)
        print(f"pushed to {url}")


def _extract_lora(args: argparse.Namespace) -> None:
    from merger.lora.extract import extract_lora

    print(f"{'tensor':60s} {'shape':>14s} {'rank':>6s} {'energy':>8s} {'rel. error':>10s}")

    def show(row) -> None:
        shape = "×".join(map(str, row.shape))
        print(f"{row.name:60s} {shape:>14s} {row.rank or 'whole':>6} {row.energy:8.4f} {row.relative_error:10.4f}")

    rows = extract_lora(args.finetune, args.base, args.out, rank=args.rank, energy=args.energy, token=get_token(),
                        progress=show)
    print(f"wrote {args.out}: {len(rows)} tensors, lowest retained energy {min(r.energy for r in rows):.4f}")


def _validate(args: argparse.Namespace) -> None:
    from merger.evaluate.cli import run_report
    from merger.validate import validate_config

    report = validate_config(_read_config(args.config), token=get_token())
    print(f"OK: {report.summary()}")
    print(f"layers: {report.num_layers}")
    print(f"parameters: {report.parameter_count}")
    if args.report:
        run_report(_read_config(args.config), get_token())


def _read_config(path: Path) -> str:
    """The config file's text, read with the parser's limits.

    Raises:
        MergerError: the file does not exist, is a folder, or cannot be read (one line, the reason named).
        ConfigError: as :func:`merger.config.parse.read_config_file` (too large, not UTF-8, holds a token).
    """
    shown = excerpt(str(path), 200)
    if path.is_dir():
        raise MergerError(f"config file `{shown}` is a folder; give the path of a YAML file")
    try:
        return read_config_file(path)
    except FileNotFoundError:
        raise MergerError(f"config file `{shown}` does not exist") from None
    except OSError as err:
        raise MergerError(f"config file `{shown}` cannot be read ({err.strerror or type(err).__name__}); "
                          "check its permissions") from None


class _TqdmHandler(logging.Handler):
    """Warnings above the progress bar, not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def main(argv: list[str] | None = None, *, freeze_imports: bool = False) -> int:
    """Run the CLI; returns the exit status (0, or 2 with `error: ErrorClass: message` on stderr for a MergerError).

    Args:
        argv: the arguments (default: the process's).
        freeze_imports: `python -m merger` (merger/__main__.py) turns the cyclic garbage collector off
            before it imports this module; once the command's imports are done, freeze the objects
            they made and turn it back on (:func:`_import_work`).
    """
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("merger")
    handler, propagate = _TqdmHandler(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # for this call only: warnings print once, above the bar
    try:
        if args.command in ("run", "validate") and not args.config.is_file():  # before any other work
            _read_config(args.config)  # says why
        if args.command == "run":
            _run(args, freeze_imports)
            return 0
        _import_work(freeze_imports)
        from merger.evaluate.cli import run_eval, run_suggest

        if args.command == "extract-lora":
            _extract_lora(args)
        elif args.command in ("eval", "suggest"):
            (run_eval if args.command == "eval" else run_suggest)(args, get_token())
        else:
            _validate(args)
    except MergerError as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)  # the class name: a stable label for scripts
        return 2
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    return 0
