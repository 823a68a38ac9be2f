"""Text conditioning: tokenizers and encoders behind one interface (docs/architecture.md,
"Text-to-image").

``tokenizer_for(cfg)`` maps prompts to ids ``int64 [B, max_len]`` (``PAD`` = -1); the
network's :class:`~denoiselab.models.text_jit.TextConditioner` maps ids to context tokens.
:func:`encode` runs both halves for a caller that wants ``(tokens [B, L, D_text], mask [B, L])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from denoiselab.text.config import PAD, TextConfig
from denoiselab.text.vocab import UnknownWordError, WordTokenizer, build_vocab, split_words

Tokenizer = Callable[[Sequence[str]], Tensor]


def tokenizer_for(cfg: TextConfig) -> Tokenizer:
    """The prompt → ids tokenizer of a resolved text config."""
    if cfg.encoder == "words":
        return WordTokenizer(cfg.vocab, cfg.max_len)
    from denoiselab.text.hf import HFTokenizer

    return HFTokenizer(cfg)


__all__ = [
    "PAD",
    "TextConfig",
    "Tokenizer",
    "UnknownWordError",
    "WordTokenizer",
    "build_vocab",
    "split_words",
    "tokenizer_for",
]
