"""Periodic evaluation inside ``denoiselab train`` (``TrainConfig.eval``).

The training run scores its own EMA weights with :func:`denoiselab.metrics.evaluate`: the
offline probe metrics by default, on the run's data in pixels (the source images of a latent
cache), samples decoded through the run's autoencoder. Probe and reference statistics are
cached by content hash, so only the first evaluation of a dataset pays for them (the probe
trains with gradients: only the sampling runs under ``no_grad``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from denoiselab.metrics import evaluate
from denoiselab.metrics.images import to_uint8

if TYPE_CHECKING:
    from denoiselab.train.loop import Trainer


def evaluate_network(trainer: Trainer, net: nn.Module) -> dict[str, float]:
    """``cfg.eval`` metrics of ``net`` (a copy of the trainer's network) -> ``{name: value}``,
    with ``probe_real_accuracy`` (the probe on held-out real images) when a probe scored."""
    from denoiselab.latents import pixel_data_config

    cfg, ev = trainer.cfg, trainer.cfg.eval
    sampler = trainer.sampler(net)

    def sample(n: int, labels: Tensor, seed: int) -> Tensor:
        x = sampler(
            labels[:n],
            seed,
            steps=ev.steps or cfg.sample.steps,
            solver=cfg.sample.solver,
            cfg_scale=cfg.sample.cfg if ev.cfg is None else ev.cfg,
            interval=cfg.sample.interval,
        )
        return to_uint8(x.cpu())

    result = evaluate(
        sample,
        metrics=list(ev.metrics),
        num=ev.num,
        dataset_cfg=pixel_data_config(cfg.data),
        num_classes=trainer.model_cfg.num_classes,
        batch=ev.batch,
        seed=ev.seed,
        cache_dir=ev.cache_dir,
        probe_config=ev.probe_config(),
        device=trainer.device,
    )
    values = {k: float(v) for k, v in result["metrics"].items()}
    if result["probe_real_accuracy"] is not None:  # the judge's own accuracy on real images
        values["probe_real_accuracy"] = result["probe_real_accuracy"]
    return values
