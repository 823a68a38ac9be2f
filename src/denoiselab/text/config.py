"""Text conditioning of a network (``model.text``): which encoder, how tokens enter the net.

A text-conditioned network takes as its condition ``y`` the prompt's token ids
``int64 [B, max_len]``, padded with :data:`PAD` (``-1``). A row of ``PAD`` only is the empty
prompt: the unconditional input that caption dropout trains and CFG subtracts.
"""

from __future__ import annotations

from dataclasses import dataclass

PAD = -1  # token id of padding; all-PAD = the empty prompt (unconditional)

ENCODERS = ("words", "t5", "clip", "auto")
MODES = ("joint", "cross")


@dataclass(frozen=True)
class TextConfig:
    """``model.text``: text conditioning of JiT. Validated at construction.

    mode: ``joint`` — text tokens join the image tokens in every block's attention and MLP
        (one stream, PRX-style; text tokens are updated by the blocks, RoPE on image tokens
        only); ``cross`` — image tokens only in self-attention, plus a cross-attention
        sublayer per block whose keys/values are the (fixed) projected text tokens.
    encoder: ``words`` (offline: a word-level tokenizer over the data's captions and a
        learned embedding table + learned positions, trained with the model and checkpointed);
        ``t5`` (T5EncoderModel), ``clip`` (CLIPTextModel), ``auto`` (AutoModel; its encoder
        if it is an encoder–decoder, e.g. T5Gemma): frozen, from the local directory ``path``.
    dim: width D_text of the encoder's tokens (0: resolved — ``words``: the network width;
        transformers encoders: their ``hidden_size``/``d_model``).
    max_len: tokens per prompt (0: resolved — ``words``: the longest caption of the data;
        transformers encoders: the tokenizer's ``model_max_length``, at most 256).
    vocab: the ``words`` vocabulary (resolved from the data's captions; recorded in the run's
        config so sampling tokenises exactly as training did).
    cache: a directory written by ``denoiselab cache-text`` (transformers encoders only):
        training reads each caption's stored embeddings instead of running the encoder, which
        is then loaded only when a prompt is sampled (:mod:`denoiselab.text.embed_cache`).
    """

    mode: str = "joint"
    encoder: str = "words"
    path: str | None = None
    dim: int = 0
    max_len: int = 0
    vocab: tuple[str, ...] = ()
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"model.text.mode={self.mode!r}; valid: {', '.join(MODES)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"model.text.encoder={self.encoder!r}; valid: {', '.join(ENCODERS)}")
        if self.encoder == "words" and self.path is not None:
            raise ValueError(
                f"model.text.path={self.path!r} is given but model.text.encoder='words' needs no "
                "weights; set encoder to t5, clip or auto to load one"
            )
        if self.encoder != "words" and not self.path:
            raise ValueError(
                f"model.text.path is required for model.text.encoder={self.encoder!r}: a local "
                "directory holding the encoder's config.json, model.safetensors and tokenizer"
            )
        if self.encoder == "words" and self.cache is not None:
            raise ValueError(
                f"model.text.cache={self.cache!r} is for a frozen transformers encoder; the "
                "'words' table is trained with the model and cannot be cached"
            )
        if self.encoder != "words" and self.vocab:
            raise ValueError("model.text.vocab is only for encoder='words'")
        for key in ("dim", "max_len"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.text.{key}={getattr(self, key)!r} must be >= 0")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("model.text.vocab has repeated words")

    @property
    def resolved(self) -> bool:
        """Whether dim, max_len (and the vocabulary for ``words``) are known."""
        return self.dim > 0 and self.max_len > 0 and (self.encoder != "words" or bool(self.vocab))
