"""Helpers shared by the fine-tuning tests (tiny char tokenizer, synthetic data)."""

import json
import random
import string

from gptforge.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer() -> Tokenizer:
    return Tokenizer.train_char([string.printable], special_tokens=SPECIALS)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def sorted_digits(n: int, seed: int, lengths=(3, 5)) -> list[dict]:
    """Digit strings, half of them sorted; label yes when sorted."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        digits = [rng.randint(0, 9) for _ in range(rng.randint(*lengths))]
        if i % 2 == 0:
            digits.sort()
        text = "".join(map(str, digits))
        out.append({"text": text, "label": "yes" if list(text) == sorted(text) else "no"})
    return out


NUMBER_WORDS = "zero one two three four five six seven eight nine".split()


def number_words(n: int, seed: int) -> list[dict]:
    """'seven two=' -> '72': one or two number words to digits."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        digits = [rng.randint(0, 9) for _ in range(rng.randint(1, 2))]
        out.append({"prompt": " ".join(NUMBER_WORDS[d] for d in digits) + "=",
                    "completion": "".join(map(str, digits))})
    return out
