"""Seeded synthetic tasks and the char-level tokenizer of the sample.

Every prompt names its task in words and ends with "="; the answer is a few characters followed by <eos>:

    add 123+45=        168
    reverse kqzvb=     bvzqk
    sort 50913=        01359
    close (()((=       )))
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, <pad> = 0
CHARACTERS = " ()+=" + string.digits + string.ascii_lowercase
TASKS = ("add", "reverse", "sort", "brackets")
MAX_ANSWER_CHARS = 6


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _add(rng: random.Random) -> Example:
    a = rng.randrange(10 ** rng.randint(1, 2))
    b = rng.randrange(10 ** rng.randint(1, 2))
    return Example("add", f"add {a}+{b}=", str(a + b))


def _reverse(rng: random.Random) -> Example:
    text = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 5)))
    return Example("reverse", f"reverse {text}=", text[::-1])


def _sort(rng: random.Random) -> Example:
    digits = "".join(rng.choices(string.digits, k=rng.randint(3, 5)))
    return Example("sort", f"sort {digits}=", "".join(sorted(digits)))


def _brackets(rng: random.Random) -> Example:
    """Bracket matching: close every bracket a random, never-negative prefix left open."""
    chars, depth = [], 0
    for _ in range(rng.randint(3, 12)):
        opening = depth == 0 or rng.random() < 0.55
        chars.append("(" if opening else ")")
        depth += 1 if opening else -1
    if depth == 0:
        chars.append("(")
        depth = 1
    return Example("brackets", f"close {''.join(chars)}=", ")" * depth)


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "brackets": _brackets,
}


def sample(task: str, rng: random.Random) -> Example:
    return GENERATORS[task](rng)


def distinct_examples(task: str, count: int, rng: random.Random, exclude: Iterable[str] = ()) -> list[Example]:
    """`count` examples of `task` with distinct prompts, none of them in `exclude`."""
    seen = set(exclude)
    out: list[Example] = []
    while len(out) < count:
        example = sample(task, rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
    return out


def build_tokenizer() -> Tokenizer:
    """One token per character; encodings start with <bos>; decoding joins characters without spaces."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer
