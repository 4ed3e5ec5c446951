"""Evaluation texts: the default set shipped in `data/`, text files, or a Hub dataset split.

Every text is bounded in bytes when read (:data:`MAX_TEXT_BYTES`); the scorer bounds it again in tokens.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from merger.errors import EvalTextError, excerpt

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TEXTS = ("prose", "code", "chat")
MAX_TEXT_BYTES = 8 * 2**20  # per text; a few thousand tokens are scored, so more is never needed
DATASET_SUFFIXES = (".txt", ".jsonl", ".json")
MAX_DATASET_FILES = 8  # files of one split read at most (in name order)
# A split file is downloaded whole before its first MAX_TEXT_BYTES are read: a larger one is refused
# from its listed size, so a named split never fills the worker's disk.
MAX_DATASET_FILE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class EvalText:
    """One text the models are scored on.

    Attributes:
        name: the column of the table (`prose`, `code`, `chat`, a file's stem, a split's name).
        text: the UTF-8 text; documents may end with the literal EOS string (`</s>`).
    """

    name: str
    text: str


def default_texts() -> list[EvalText]:
    """The shipped evaluation set: prose, code and chat (licenses in `data/README.md`)."""
    return [EvalText(name, (DATA_DIR / f"{name}.txt").read_text(encoding="utf-8")) for name in DEFAULT_TEXTS]


def split_in_halves(texts: list[EvalText]) -> tuple[list[EvalText], list[EvalText]]:
    """Each text cut in two at the document end (`</s>`, else the line end) nearest its middle: the first
    halves are a search split, the second halves a judging split the search never sees."""
    first, second = [], []
    for text in texts:
        middle = len(text.text) // 2
        ends = [i + len(end) for end in ("</s>", "\n") for i in _positions(text.text, end)]
        cut = min(ends, key=lambda i: abs(i - middle)) if ends else middle
        first.append(EvalText(text.name, text.text[:cut]))
        second.append(EvalText(text.name, text.text[cut:]))
    return first, second


def _positions(text: str, needle: str) -> list[int]:
    out, at = [], text.find(needle)
    while at >= 0:
        out.append(at)
        at = text.find(needle, at + 1)
    return out


def read_text_file(path: Path, name: str | None = None) -> EvalText:
    """A text file (`.gz` is decompressed) as an :class:`EvalText` named by its stem.

    Raises:
        EvalTextError: the file is missing, over :data:`MAX_TEXT_BYTES`, not UTF-8, or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalTextError(f"`--text {excerpt(str(path))}` is not a file; give a UTF-8 text file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read(MAX_TEXT_BYTES + 1)
    stem = path.name.removesuffix(".gz").rsplit(".", 1)[0]
    return _checked(name or stem, data, f"`--text {excerpt(str(path))}`")


def dataset_texts(spec: str, token: str | None = None) -> list[EvalText]:
    """The text of a Hub dataset split, `ID:SPLIT` (e.g. `alice/notes:test`), as one :class:`EvalText`.

    The split's files are the repo's `.txt`, `.jsonl` and `.json` files whose name starts with the split
    (`test.txt`, `data/test-00000.jsonl`) or that lie in a folder named after it (`test/a.txt`);
    JSON lines contribute their `text` field. Read through huggingface_hub, at most
    :data:`MAX_DATASET_FILES` files and :data:`MAX_TEXT_BYTES` bytes; files are downloaded in name order
    until their listed sizes reach :data:`MAX_TEXT_BYTES`.

    Raises:
        EvalTextError: a malformed spec, a missing repo or split, a split file over
            :data:`MAX_DATASET_FILE_BYTES`, or no text in it.
    """
    import httpx2  # huggingface_hub's HTTP client: a dead network raises its transport errors
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    repo_id, _, split = spec.rpartition(":")
    if not repo_id or not split or "/" in split:
        raise EvalTextError(f"`--dataset {excerpt(spec)}`: write the dataset as `ID:SPLIT`, e.g. `org/name:test`")
    try:
        listed = HfApi(token=token).list_repo_tree(repo_id, repo_type="dataset", recursive=True)
        files = _split_files(sorted((f.path, f.size) for f in listed if getattr(f, "size", None) is not None
                                    and _in_split(f.path, split)), spec)
        paths = [hf_hub_download(repo_id, f, repo_type="dataset", token=token) for f in files]
    except (HfHubHTTPError, HFValidationError, httpx2.HTTPError, OSError) as err:
        raise EvalTextError(f"`--dataset {excerpt(spec)}`: the dataset could not be read "
                            f"({type(err).__name__}); check the id and your access") from None
    if not paths:
        raise EvalTextError(f"`--dataset {excerpt(spec)}`: no `.txt`/`.jsonl`/`.json` file of split "
                            f"`{excerpt(split)}` in the repo; name a split the dataset has")
    chunks, size = [], 0
    for path in paths:
        text = _text_of(Path(path), spec)
        chunks.append(text)
        size += len(text.encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            break
    return [_checked(split, "\n".join(chunks).encode("utf-8")[:MAX_TEXT_BYTES], f"`--dataset {excerpt(spec)}`",
                     cut=True)]


def _split_files(listed: list[tuple[str, int]], spec: str) -> list[str]:
    """The split's files to download, from their (path, stored bytes) in name order: at most
    :data:`MAX_DATASET_FILES`, until their sizes reach :data:`MAX_TEXT_BYTES`; one over
    :data:`MAX_DATASET_FILE_BYTES` is refused before any download."""
    files, size = [], 0
    for path, stored in listed[:MAX_DATASET_FILES]:
        if stored > MAX_DATASET_FILE_BYTES:
            raise EvalTextError(f"`--dataset {excerpt(spec)}`: the split's file `{excerpt(path)}` is "
                                f"{stored:,} bytes, over the {MAX_DATASET_FILE_BYTES:,} bytes a file "
                                "may have here (a few thousand tokens are scored); name a smaller split, or paste text")
        files.append(path)
        size += stored
        if size >= MAX_TEXT_BYTES:
            break
    return files


def _in_split(path: str, split: str) -> bool:
    parts = path.split("/")
    return path.endswith(DATASET_SUFFIXES) and (parts[-1].startswith(split) or split in parts[:-1])


def _text_of(path: Path, spec: str) -> str:
    with open(path, "rb") as handle:
        data = handle.read(MAX_TEXT_BYTES).decode("utf-8", errors="ignore")
    if path.suffix == ".txt":
        return data
    rows = [line for line in data.splitlines() if line.strip()] if path.suffix == ".jsonl" else [data]
    texts = []
    for row in rows:
        try:
            value = json.loads(row)
        except json.JSONDecodeError:
            continue  # a line cut by the byte bound, or not JSON: skipped, the rest still counts
        values = value if isinstance(value, list) else [value]
        texts += [v["text"] for v in values if isinstance(v, dict) and isinstance(v.get("text"), str)]
    return "\n".join(texts)


def _checked(name: str, data: bytes, where: str, cut: bool = False) -> EvalText:
    if len(data) > MAX_TEXT_BYTES and not cut:
        raise EvalTextError(f"{where} is over {MAX_TEXT_BYTES // 2**20} MiB; give a shorter text "
                            "(a few thousand tokens are scored)")
    try:
        text = data.decode("utf-8", errors="ignore" if cut else "strict")  # a cut may split a character
    except UnicodeDecodeError:
        raise EvalTextError(f"{where} is not UTF-8 text; convert it to UTF-8") from None
    if not text.strip():
        raise EvalTextError(f"{where} holds no text; give a text to score the models on")
    return EvalText(name, text)
