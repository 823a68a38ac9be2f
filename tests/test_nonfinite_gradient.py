"""A NaN that appears only in a gradient (the loss stays finite) stops the run at the step
where it appeared, like a non-finite loss, and never reaches a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.loop import NonFiniteGradientError, NonFiniteLossError, Trainer
from denoiselab.train.run import read_metrics
from tests.test_train import _weights, tiny


def _poison_gradient_at(trainer: Trainer, bad_step: int) -> None:
    """Make one parameter's gradient NaN in step ``bad_step`` (1-based), forward untouched."""
    armed = {"on": bad_step == 1}

    def arm(state) -> None:  # callbacks run after each step: arm the next one
        armed["on"] = state.step == bad_step - 1

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan if armed["on"] else grad

    next(trainer.model.parameters()).register_hook(hook)
    trainer.callbacks.append(arm)


@pytest.mark.parametrize("clip", [1.0, None])  # with clipping the norm is computed anyway
@pytest.mark.parametrize("bad_step", [6, 8])  # 8 is the last step: its update was saved
def test_nan_gradient_with_finite_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path, bad_step, clip
):
    cfg = tiny(**{"optim.grad_clip": "null" if clip is None else clip})
    trainer = Trainer(cfg, tmp_path / "r", quiet=True)  # 8 steps, checkpoints at 4 and 8
    _poison_gradient_at(trainer, bad_step)
    with pytest.raises(NonFiniteGradientError, match=f"gradient is not finite at step {bad_step} "):
        trainer.run()
    assert issubclass(NonFiniteGradientError, NonFiniteLossError)  # old handlers still catch it
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert rows and all(math.isfinite(r["loss"]) for r in rows if r["step"] <= bad_step)
    assert ckpt_io.load_checkpoint(tmp_path / "r").step == 4
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "r").values())
