"""The flags of `eval`, `suggest` and `run --eval`, for `merger/cli.py`'s parser.

Apart from the handlers (:mod:`merger.evaluate.cli`), which import torch: the command line builds its
parser before it imports torch (see :mod:`merger.cli`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the `eval` and `suggest` subcommands."""
    evaluate = commands.add_parser("eval", help="bits per token of models on evaluation text, KL from a merge, greedy answers")
    evaluate.add_argument("models", nargs="+", metavar="MODEL", help="model folders or Hub ids")
    evaluate.add_argument("--merge", metavar="MODEL", help="the merge: KL of its next-token distribution from each MODEL's")
    add_eval_flags(evaluate)
    suggest = commands.add_parser("suggest", help="search a merge of 2-3 fine-tunes of BASE; prints mergekit YAML")
    suggest.add_argument("base", metavar="BASE", help="the base model (folder or Hub id)")
    suggest.add_argument("fine_tunes", nargs="+", metavar="FT", help="two or three fine-tunes of BASE")
    suggest.add_argument("--search-text", type=Path, action="append", metavar="FILE",
                         help="text the candidates are scored on (repeatable; default: the first half of each shipped text)")
    suggest.add_argument("--text", type=Path, action="append", metavar="FILE",
                         help="text that judges the suggestion at the end (repeatable; must differ from the search "
                         "text; default: the second half of each shipped text)")
    suggest.add_argument("--budget-candidates", type=int, default=24, metavar="N", help="candidates merged and scored at most")
    suggest.add_argument("--budget-minutes", type=float, default=10.0, metavar="M", help="minutes of search at most")
    suggest.add_argument("--max-tokens", type=int, default=2048, help="tokens per search text (default 2048)")
    suggest.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    suggest.add_argument("--seed", type=int, default=0, help="seed of DARE masks (written into the YAML)")


def add_eval_flags(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The text and budget flags shared by `eval` and `run --eval` (`device`: also add `--device`)."""
    texts = parser.add_mutually_exclusive_group()
    texts.add_argument("--text", type=Path, action="append", metavar="FILE", help="a UTF-8 text file to score on (repeatable)")
    texts.add_argument("--dataset", metavar="ID:SPLIT", help="a Hub dataset split (its .txt/.jsonl files)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens scored per text and model (default 4096)")
    parser.add_argument("--max-minutes", type=float, default=10.0, help="minutes of evaluation at most (default 10)")
    parser.add_argument("--prompt", action="append", help="a prompt answered greedily (repeatable; default: three)")
    if device:
        parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
