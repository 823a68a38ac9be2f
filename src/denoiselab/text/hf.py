"""Frozen transformers text encoders from a local directory (T5, CLIP text, AutoModel).

Nothing is downloaded (``local_files_only``) and weights load only as safetensors, through
the loader the teachers and metric extractors share (:func:`denoiselab.encoders.hf.load_pretrained`).
The tokenizer is the directory's own ``tokenizer.json`` (read as JSON by ``tokenizers``, with
``model_max_length`` from ``tokenizer_config.json``). The empty prompt is all padding (the unconditional
input), whatever the tokenizer would add for ``""``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from denoiselab.config import ConfigError
from denoiselab.encoders.hf import import_transformers, load_pretrained
from denoiselab.text.config import PAD, TextConfig
from denoiselab.text.vocab import warn_truncated

CLASSES = {"t5": "T5EncoderModel", "clip": "CLIPTextModel", "auto": "AutoModel"}
MAX_LEN_CAP = 256  # a tokenizer's model_max_length can be "infinite" (1e30)


def text_dir(cfg: TextConfig) -> Path:
    """``model.text.path`` checked to be a model directory (a ConfigError naming the key)."""
    path = Path(str(cfg.path)).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.text.path={str(cfg.path)!r} holds no config.json: give the local directory "
            f"of a {cfg.encoder} text encoder (config.json, model.safetensors, tokenizer files)"
        )
    return path


def encoder_width(cfg: TextConfig) -> int:
    """D_text of the encoder at ``cfg.path``, from its ``config.json`` alone."""
    data = json.loads((text_dir(cfg) / "config.json").read_text())
    for source in (data, data.get("text_config") or {}, data.get("encoder") or {}):
        for key in ("hidden_size", "d_model"):
            if isinstance(source.get(key), int):
                return int(source[key])
    raise ConfigError(f"model.text.path={cfg.path!r}: config.json names no hidden_size/d_model")


class HFTokenizer:
    """prompts → ids ``int64 [B, max_len]`` with the directory's tokenizer; padding ``PAD``."""

    def __init__(self, cfg: TextConfig) -> None:
        transformers = import_transformers("model.text.encoder", ConfigError)
        from tokenizers import Tokenizer

        path = text_dir(cfg)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(
                f"model.text.path={str(path)!r} holds no tokenizer.json: denoiselab reads "
                "tokenizers only from that JSON file (no code, no pickle); write it once with "
                "transformers (load the tokenizer with AutoTokenizer, then save_pretrained to DIR)"
            )
        config = path / "tokenizer_config.json"
        limit = json.loads(config.read_text()).get("model_max_length") if config.is_file() else None
        try:
            self.tok = transformers.PreTrainedTokenizerFast(
                tokenizer_object=Tokenizer.from_file(str(file)),
                **({"model_max_length": limit} if isinstance(limit, int) else {}),
            )
        except Exception as err:  # a malformed file: say which
            raise ConfigError(f"{str(file)!r}: not a usable tokenizer: {err}") from None
        self.max_len = cfg.max_len or default_max_len(self.tok)

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str):
            raise TypeError("HFTokenizer takes a list of prompts, not one string")
        ids = torch.full((len(prompts), self.max_len), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if not prompt.strip():
                continue  # the empty prompt: all padding, the unconditional input
            full = self.tok(prompt, add_special_tokens=True)["input_ids"]
            if len(full) > self.max_len:
                kept = self.tok(prompt, truncation=True, max_length=self.max_len)["input_ids"]
                warn_truncated(prompt, len(full), self.max_len, self.tok.decode(kept))
                full = kept
            ids[row, : len(full)] = torch.tensor(full, dtype=torch.long)
        return ids


def default_max_len(tok: object) -> int:
    n = getattr(tok, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n <= MAX_LEN_CAP else MAX_LEN_CAP


class FrozenTextEncoder(nn.Module):
    """ids ``[B, L]`` (``PAD`` = -1) → tokens ``float [B, L, D_text]`` (0 at padding).

    The last hidden state of a frozen transformers encoder; padded positions get attention
    mask 0 (and an arbitrary valid id), and their outputs are zeroed: the network masks them.
    """

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model, self.pad_id = model, pad_id

    @torch.no_grad()
    def forward(self, ids: Tensor) -> Tensor:
        mask = ids >= 0
        tokens = self.model(
            input_ids=torch.where(mask, ids, self.pad_id), attention_mask=mask.long()
        ).last_hidden_state
        return torch.where(mask[..., None], tokens.float(), 0.0)


class LazyTextEncoder:
    """:func:`load_text_encoder` of ``cfg`` on first call (ids → tokens, as the encoder):
    a run on cached embeddings loads its encoder only to sample prompts."""

    def __init__(self, cfg: TextConfig) -> None:
        self.cfg, self.encoder = cfg, None
        text_dir(cfg)  # a missing directory fails at build time, not at the first grid

    def to(self, device: torch.device | str) -> LazyTextEncoder:
        if self.encoder is None:
            self.encoder = load_text_encoder(self.cfg)
        self.encoder = self.encoder.to(device)
        return self

    def __call__(self, ids: Tensor) -> Tensor:
        # the conditioner moves its frozen encoder to the ids' device first (which loads it)
        return (self.encoder or self.to(ids.device).encoder)(ids)


def load_text_encoder(cfg: TextConfig) -> FrozenTextEncoder:
    """The frozen encoder ``cfg.encoder`` from ``cfg.path`` (float32, eval, no gradients)."""
    path = text_dir(cfg)
    model = load_pretrained(path, CLASSES[cfg.encoder], "model.text.encoder", ConfigError)
    if cfg.encoder == "auto" and hasattr(model, "get_encoder"):
        model = model.get_encoder()  # encoder–decoder (T5Gemma, T5): its encoder only
    width = encoder_width(cfg)
    if cfg.dim and cfg.dim != width:
        raise ConfigError(
            f"model.text.dim={cfg.dim} but the encoder at {str(path)!r} gives {width}"
        )
    pad = getattr(model.config, "pad_token_id", None)
    return FrozenTextEncoder(model, int(pad) if isinstance(pad, int) and pad >= 0 else 0)
