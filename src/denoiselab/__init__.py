"""denoiselab: train, sample, evaluate and ablate denoising Transformers that predict clean data.

Time convention (used everywhere): ``t = 1`` is data, ``t = 0`` is noise,
``z_t = t·x + (1−t)·ε`` with ``ε ~ N(0, noise_scale²·I)`` and velocity ``v = x − ε``.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "from_pretrained"]


def __getattr__(name: str):  # lazy: `import denoiselab` stays light
    if name == "from_pretrained":
        from denoiselab.interop.pretrained import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'denoiselab' has no attribute {name!r}")
