"""Writes the T5 tokenizer fixtures: transformers' fast tokenizer (tokenizer.json) converted from
the tiny PixArt SentencePiece model, and the ids transformers gives for a set of prompts, so the
Rust tests can check that a T5 tokenizer folder with only `tokenizer.json` or only `spiece.model`
gives the same tokens (Flux's `tokenizer_2`, PixArt's `tokenizer`).

Needs the tiny PixArt fixture (tools/reference/make_pixart_fixtures.py) and:
    pip install transformers sentencepiece protobuf tokenizers
Run from the repository root:
    python tools/reference/make_t5_tokenizer_fixtures.py
Writes tests/fixtures/t5-tokenizer/{tokenizer.json, tokens.json}.
"""

import json
import os
import shutil
import tempfile

import transformers
from transformers import T5Tokenizer, T5TokenizerFast

SPIECE_FOLDER = "tests/fixtures/tiny-pixart/tokenizer"
OUT = "tests/fixtures/t5-tokenizer"

PROMPTS = [
    "a photo of a cat",
    "A tiny astronaut hatching from an egg on the moon.",
    "  leading and   repeated   spaces  ",
    "Punctuation: commas, periods... and (brackets)!? 42 apples, 3.5 kg",
    "naïve café — “quotes” and émojis 🙂",
    "UPPER lower MiXeD",
    "word " * 80,
    "",
]
MAX_LENGTHS = [16, 300]


def main():
    slow = T5Tokenizer.from_pretrained(SPIECE_FOLDER, legacy=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The fast tokenizer transformers converts from the SentencePiece model.
        fast = T5TokenizerFast.from_pretrained(SPIECE_FOLDER, from_slow=True, legacy=True)
        fast.save_pretrained(tmp)
        os.makedirs(OUT, exist_ok=True)
        shutil.copy(os.path.join(tmp, "tokenizer.json"), os.path.join(OUT, "tokenizer.json"))
    cases = []
    for prompt in PROMPTS:
        for max_length in MAX_LENGTHS:
            kwargs = dict(padding="max_length", max_length=max_length, truncation=True)
            a = slow(prompt, **kwargs)
            b = fast(prompt, **kwargs)
            assert a["input_ids"] == b["input_ids"], (prompt, a["input_ids"], b["input_ids"])
            cases.append(
                {
                    "prompt": prompt,
                    "max_length": max_length,
                    "ids": a["input_ids"],
                    "mask": a["attention_mask"],
                }
            )
    with open(os.path.join(OUT, "tokens.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
