"""The dataset contract shared by every built-in dataset.

A dataset is map-style: ``ds[i] -> (image, label)`` with ``image: float32 [C, H, W]`` in
``[-1, 1]`` and ``label: int`` in ``[0, num_classes)``. Randomness that depends on the epoch
(horizontal flips) goes through :meth:`ImageDataset.get_item`, so that the training loader
can pass the epoch in and a resumed run sees exactly the same pixels.

Per-sample side data ("extras", e.g. a teacher's features stored beside cached latents) is
opt-in: after ``ds.request_extras(("teacher",))`` items are ``(image, label, {name: tensor})``
(the loader collates the dict; the loop hands it to the loss terms as ``StepContext.extras``).
Without a request every dataset returns pairs, as before.
"""

from __future__ import annotations

import operator
from typing import SupportsIndex

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from denoiselab.config import ConfigError

# Stream tag that keeps flip draws independent of every other use of (seed, index, ...).
_FLIP_STREAM = 0x0F11B


def flip_decision(seed: int, index: int, epoch: int) -> bool:
    """Whether sample ``index`` is mirrored in ``epoch``: a fair coin, pure in its arguments."""
    return bool(np.random.default_rng((_FLIP_STREAM, seed, index, epoch)).random() < 0.5)


def uint8_to_model(array: np.ndarray) -> Tensor:
    """``uint8 [H, W, C]`` → ``float32 [C, H, W]`` in ``[-1, 1]`` (JiT: ``x / 255 · 2 − 1``)."""
    x = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1).contiguous()
    return x.div_(255).mul_(2).sub_(1)


class ImageDataset(Dataset):
    """Base class: subclasses set the attributes and implement ``__len__`` and ``_load``.

    Attributes:
        num_classes: number of labels; the null class of CFG is ``num_classes``.
        channels: 1 or 3.
        image_size: side of the square images, in pixels.
        class_names: ``class_names[label]`` is a readable name.
        seed: seeds everything that is random about a sample (content, flips).
        hflip: mirror each sample with probability 1/2, decided by ``(seed, index, epoch)``.
        cache: keep each loaded (un-flipped) sample in memory after its first load, so
            later epochs skip decoding or rendering; costs ``4·C·H·W`` bytes per sample
            (in each loader worker process).
        captions_follow_flips: ``caption(i, epoch)`` describes the mirrored image when the
            flip mirrors it (``shapes``: left and right swap); False where captions are fixed.
    """

    captions_follow_flips: bool = False

    num_classes: int
    channels: int
    image_size: int
    class_names: list[str]
    seed: int = 0
    hflip: bool = False
    cache: bool = False
    extras: tuple[str, ...] = ()

    def available_extras(self) -> tuple[str, ...]:
        """Names of the per-sample side data this dataset can return (none by default)."""
        return ()

    def request_extras(self, names: tuple[str, ...]) -> None:
        """Return ``(image, label, {name: tensor})`` items from now on (module doc)."""
        missing = [n for n in names if n not in self.available_extras()]
        if missing:
            have = ", ".join(self.available_extras()) or "none"
            raise ConfigError(
                f"{type(self).__name__} cannot provide {missing} per sample (it provides: {have})"
            )
        self.extras = tuple(dict.fromkeys((*self.extras, *names)))

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> tuple[Tensor, int]:
        """Un-flipped sample ``index`` (already range-checked)."""
        raise NotImplementedError

    def get_item(self, index: SupportsIndex, epoch: int = 0) -> tuple[Tensor, int]:
        """Sample ``index`` as seen in ``epoch``: ``(image [C, H, W] in [-1, 1], label)``."""
        i = self._check_index(index)
        if self.cache:
            store = self.__dict__.setdefault("_cached", {})
            if i not in store:
                store[i] = self._load(i)
            image, label = store[i]
        else:
            image, label = self._load(i)
        if self.hflip and flip_decision(self.seed, i, epoch):
            image = image.flip(-1)
        return image, label

    def __getitem__(self, index: SupportsIndex) -> tuple[Tensor, int]:
        return self.get_item(index, epoch=0)

    def label(self, index: SupportsIndex) -> int:
        """The label of sample ``index``, without decoding or rendering its pixels where the
        dataset knows it beforehand (every built-in one does; this default loads the item)."""
        return int(self[index][1])

    def caption(self, index: SupportsIndex, epoch: int | None = None) -> str:
        """A short English description of sample ``index`` (the class name by default).

        ``epoch``: describe the sample as ``get_item(index, epoch)`` returns it, for datasets
        whose words depend on the flip (``shapes`` says left or right); others ignore it."""
        return self.class_names[self.label(index)]

    def mirrored(self, index: SupportsIndex, epoch: int | None) -> bool:
        """Whether ``caption(index, epoch)`` describes the mirror image: ``get_item(index,
        epoch)`` flipped it and this dataset's captions follow flips (no epoch: never)."""
        return (
            epoch is not None
            and self.hflip
            and self.captions_follow_flips
            and flip_decision(self.seed, self._check_index(index), epoch)
        )

    def caption_variant(self, index: SupportsIndex, mirrored: bool) -> str:
        """The caption of sample ``index`` un-flipped (``mirrored=False``) or mirrored, whatever
        ``hflip`` says: what a latent cache stores beside each flip variant. Datasets whose
        captions ignore flips return :meth:`caption` for both."""
        return self.caption(index)

    def _check_index(self, index: SupportsIndex) -> int:
        i = operator.index(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of {len(self)}")
        return i
