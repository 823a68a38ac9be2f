"""Training: config, loop, checkpoints, EMA, run folders, distributed helpers."""

from denoiselab.train.config import EMAConfig, OptimConfig, SampleConfig, TrainConfig

__all__ = ["EMAConfig", "OptimConfig", "SampleConfig", "TrainConfig", "train"]


def __getattr__(name: str):  # lazy: importing the loop pulls in data and models
    if name == "train":
        from denoiselab.train.loop import train

        return train
    raise AttributeError(name)
