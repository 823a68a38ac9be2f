"""The offline tokenizer: words of the data's captions, nothing to download.

Words are lower-cased runs of letters/digits (punctuation is dropped), numbered in sorted
order. An unknown word is an error naming it and the vocabulary, not a silent ``<unk>``: a
prompt the model cannot read would otherwise be sampled as a different prompt without a word
of warning (a typo such as "trinagle" would quietly become "a small red <unk>").
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from denoiselab.text.config import PAD

_WORD = re.compile(r"[a-z0-9]+")
_SHOWN = 80  # vocabulary words an error lists


class UnknownWordError(ValueError):
    """A prompt holds words the ``words`` tokenizer does not know."""


def split_words(text: str) -> list[str]:
    """``"A small, red Triangle."`` → ``["a", "small", "red", "triangle"]``."""
    return _WORD.findall(text.lower())


def build_vocab(captions: Iterable[str]) -> tuple[tuple[str, ...], int]:
    """``(sorted distinct words, most words in one caption)`` of ``captions``."""
    seen: set[str] = set()
    longest = 0
    for caption in captions:
        words = split_words(caption)
        seen.update(words)
        longest = max(longest, len(words))
    return tuple(sorted(seen)), longest


def warn_truncated(prompt: str, n: int, max_len: int, kept: str) -> None:
    """The one warning for a prompt longer than the encoder takes."""
    warnings.warn(
        f"prompt {prompt!r} has {n} tokens but the text encoder takes at most max_len="
        f"{max_len}: truncated to {kept!r}",
        stacklevel=3,
    )


class WordTokenizer:
    """prompts → ids ``int64 [B, max_len]`` (word ``vocab[i]`` has id ``i``; padding ``PAD``).

    Prompts longer than ``max_len`` words are truncated with a warning naming the prompt.
    """

    def __init__(self, vocab: Sequence[str], max_len: int) -> None:
        if not vocab or max_len < 1:
            raise ValueError(f"WordTokenizer needs a vocabulary and max_len >= 1, got {max_len}")
        self.vocab, self.max_len = tuple(vocab), max_len
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str):
            raise TypeError("WordTokenizer takes a list of prompts, not one string")
        ids = torch.full((len(prompts), self.max_len), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = split_words(prompt)
            unknown = sorted({w for w in words if w not in self.index})
            if unknown:
                shown = ", ".join(self.vocab[:_SHOWN])
                more = f" … ({len(self.vocab)} words)" if len(self.vocab) > _SHOWN else ""
                raise UnknownWordError(
                    f"prompt {prompt!r} has word(s) {unknown} that this run's text encoder "
                    f"(model.text.encoder='words', built from its training captions) does not "
                    f"know; valid words: {shown}{more}"
                )
            if len(words) > self.max_len:
                warn_truncated(prompt, len(words), self.max_len, " ".join(words[: self.max_len]))
                words = words[: self.max_len]
            ids[row, : len(words)] = torch.tensor([self.index[w] for w in words], dtype=torch.long)
        return ids
