"""How captions reach a text run: resolving ``model.text`` from the data, and tokenised
captions in place of labels.

A text run's dataset is :class:`CaptionTokens` around the configured one: item ``i`` is
``(image, ids int64 [max_len])`` (``ids`` = ``tokenizer([dataset.caption(i)])[0]``, padding
``PAD`` = -1), tokenised in the loader's workers. The loader stacks ids to ``[B, max_len]`` and
the loop hands them to the network as its condition ``y`` — where a class run has labels — so
caption dropout (the objective's ``label_drop``), DDP sharding, gradient accumulation and
exact resume are the class run's code paths unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, SupportsIndex

import numpy as np
from torch import Tensor

from denoiselab.data.base import ImageDataset
from denoiselab.text import Tokenizer, build_vocab, tokenizer_for


def captions_of(dataset: Any) -> list[str]:
    """Every caption of ``dataset``, in index order."""
    return [dataset.caption(i) for i in range(len(dataset))]


def resolve_text(model_cfg: Any, dataset: Any) -> Any:
    """``model_cfg`` (a JiTConfig) with ``text`` resolved: ``words`` — vocabulary and max_len
    from every caption of ``dataset``, D_text = the network width; transformers encoders —
    D_text from the encoder's config.json, max_len from its tokenizer. Class runs: unchanged."""
    text = model_cfg.text
    if text is None or text.resolved:
        return model_cfg
    if text.encoder == "words":
        vocab, longest = text.vocab, text.max_len
        if not vocab or not longest:  # one pass over the captions gives both
            built, most = build_vocab(captions_of(dataset))
            vocab, longest = vocab or built, longest or most
        if not vocab:
            raise ValueError("model.text: the data's captions hold no words")
        text = replace(
            text,
            vocab=vocab,
            max_len=longest,
            dim=text.dim or model_cfg.hidden_size,
        )
    else:
        from denoiselab.text.hf import HFTokenizer, encoder_width

        text = replace(text, dim=text.dim or encoder_width(text), max_len=HFTokenizer(text).max_len)
    return replace(model_cfg, text=text)


class CaptionTokens(ImageDataset):
    """``dataset`` with each label replaced by its caption's token ids ``int64 [max_len]``."""

    def __init__(self, dataset: ImageDataset, tokenizer: Tokenizer, embeddings: Any = None) -> None:
        self.dataset, self.tokenizer, self.embeddings = dataset, tokenizer, embeddings
        for name in ("num_classes", "channels", "image_size", "class_names", "seed", "hflip"):
            setattr(self, name, getattr(dataset, name))

    def __getattr__(self, name: str) -> Any:  # everything else is the wrapped dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def available_extras(self) -> tuple[str, ...]:
        return self.dataset.available_extras()

    def request_extras(self, names: tuple[str, ...]) -> None:
        self.dataset.request_extras(names)

    def get_item(self, index: SupportsIndex, epoch: int = 0) -> tuple[Any, ...]:
        image, _label, *extras = self.dataset.get_item(index, epoch)
        if self.embeddings is not None:  # model.text.cache: the stored encoder output
            mirrored = self.dataset.mirrored(index, epoch)
            return (image, self.embeddings.get(int(index), mirrored), *extras)
        ids = self.tokenizer([self.dataset.caption(index, epoch)])[0]  # the image as flipped
        return (image, ids, *extras)

    def label(self, index: SupportsIndex) -> int:  # the class, not the caption's tokens
        return self.dataset.label(index)

    def caption(self, index: SupportsIndex, epoch: int | None = None) -> str:
        return self.dataset.caption(index, epoch)


def text_dataset(dataset: ImageDataset, model_cfg: Any) -> ImageDataset:
    """The dataset a run trains on: ``dataset`` itself (class run) or :class:`CaptionTokens`."""
    if model_cfg.text is None:
        return dataset
    if dataset.hflip and not dataset.captions_follow_flips:
        warnings.warn(
            "data.hflip mirrors images but not their captions: a caption naming left or right "
            "is then wrong for half the samples; set data.hflip=false if captions name positions",
            stacklevel=2,
        )
    embeddings = None
    if model_cfg.text.cache:
        from denoiselab.text.embed_cache import TextEmbeddings

        embeddings = TextEmbeddings(model_cfg.text.cache, model_cfg.text, dataset)
    return CaptionTokens(dataset, tokenizer_for(model_cfg.text), embeddings)


def class_prompts(dataset: Any, per_class: int = 8, seed: int = 0) -> list[list[str]]:
    """Up to ``per_class`` captions of each class, from images in a seeded order: the prompts
    with which a text run is sampled where a metric or grid asks for a class (label-balanced
    evaluation). A class with no image in the data gets its class name as its prompt. Labels
    are read without loading pixels (``label(i)``: on an image folder no file is decoded)."""
    base = dataset.dataset if isinstance(dataset, CaptionTokens) else dataset
    n, k = len(base), base.num_classes
    out: list[list[str]] = [[] for _ in range(k)]
    order = np.random.default_rng((0x7E47, seed)).permutation(n)
    for i in order[: min(n, 64 * per_class * k)].tolist():
        label = base.label(i)
        if len(out[label]) < per_class:
            out[label].append(base.caption(i))
        if all(len(c) >= per_class for c in out):
            break
    return [c or [base.class_names[y]] for y, c in enumerate(out)]


def prompts_for(labels: Tensor, table: list[list[str]], seed: int) -> list[str]:
    """One prompt per label of a batch sampled with noise ``seed``: the j-th occurrence of
    label ``y`` in ``labels`` takes ``table[y][(j + seed) mod len]``. A batch that repeats a
    class takes its captions in turn (all of them once it repeats it ``len`` times); the
    seed turns the start, so batches holding a class once or a few times (batch ≤ classes,
    as on ImageNet) still use all of its captions over an evaluation instead of the first."""
    seen: dict[int, int] = {}
    out = []
    for y in labels.tolist():
        j = seen.get(y, 0)
        seen[y] = j + 1
        out.append(table[y][(j + seed) % len(table[y])])
    return out
