"""Load a tokenizer folder with the transformers of the Python running this script (the test runs it in
the last 4.x release's venv, `.venv-tf4`, prepared by `.ci/run`) and print what the test compares.

Usage: `python tests/tokenizer_4x_check.py TOKENIZER_DIR TEXT_FILE...`. Prints one JSON object:
`version` (transformers), `class` (the loaded tokenizer's class), `ids` (one list of token ids per text
file, no special tokens added), `chat` (a one-turn conversation through the chat template, or null).
"""

import json
import sys

import transformers
from transformers import AutoTokenizer


def main() -> None:
    folder, texts = sys.argv[1], sys.argv[2:]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer.encode(open(path, encoding="utf-8").read(), add_special_tokens=False) for path in texts]
    chat = None
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    print(json.dumps({"version": transformers.__version__, "class": type(tokenizer).__name__, "ids": ids,
                      "chat": chat}))


if __name__ == "__main__":
    main()
