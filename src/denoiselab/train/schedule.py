"""What is due after a training step: a log row, a sample grid, an evaluation, a checkpoint.

Intervals are counted in images. **"Every N images" means: after the first step whose image
count reaches each multiple of N.** With global batch ``G``, step ``s`` (``s`` steps done,
``s·G`` images seen) is due when ``⌊s·G/N⌋ > ⌊(s−1)·G/N⌋``. So ``N`` need not be a multiple
of ``G``: ``N < G`` is due after every step, ``N = 2.5·G`` after steps 3, 5, 8, 10, …, and
``N`` larger than the run never (only the end of the run, below). Whether a step is due is a
function of ``s`` alone, so a resumed run is due at exactly the steps of an uninterrupted one.

``0`` switches a periodic event off. At the end of the run there is always a log row and a
checkpoint; a sample grid and an evaluation only where their interval is not 0:

=====================  ========================  ==============================
key                    0 means                   at the end of the run
=====================  ========================  ==============================
``log_every_nimg``     only the final row        a log row
``ckpt_every_nimg``    only the final checkpoint a checkpoint
``sample_every_nimg``  no sample grids           a grid if the interval is > 0
``eval.every_nimg``    no evaluation             an evaluation if it is > 0
=====================  ========================  ==============================

The events of one step are independent (none reads another's output); the loop runs them in
the order log, sample, evaluate, checkpoint, so that a checkpoint of step ``s`` comes after
every row of step ``s`` (resuming from it keeps those rows and drops later ones).
"""

from __future__ import annotations

from dataclasses import dataclass


def crosses(done: int, every_nimg: int, global_batch: int) -> bool:
    """Whether step ``done`` (steps completed, ≥ 1) reaches a new multiple of ``every_nimg``
    images (``every_nimg`` 0: never)."""
    if every_nimg <= 0:
        return False
    return done * global_batch // every_nimg > (done - 1) * global_batch // every_nimg


@dataclass(frozen=True)
class Due:
    """The events due after one step."""

    log: bool = False
    sample: bool = False
    evaluate: bool = False
    checkpoint: bool = False


@dataclass(frozen=True)
class Schedule:
    """The run's event intervals (images) over ``total_steps`` steps of ``global_batch``."""

    global_batch: int
    total_steps: int
    log_every_nimg: int
    sample_every_nimg: int
    ckpt_every_nimg: int
    eval_every_nimg: int = 0

    @classmethod
    def of(cls, cfg) -> Schedule:
        """The schedule of a ``TrainConfig``."""
        return cls(
            cfg.global_batch,
            cfg.steps(),
            cfg.log_every_nimg,
            cfg.sample_every_nimg,
            cfg.ckpt_every_nimg,
            cfg.eval.every_nimg,
        )

    def due(self, done: int) -> Due:
        """What is due after step ``done`` (1 … ``total_steps``)."""
        last = done == self.total_steps

        def every(nimg: int) -> bool:
            return crosses(done, nimg, self.global_batch)

        return Due(
            log=last or every(self.log_every_nimg),
            sample=self.sample_every_nimg > 0 and (last or every(self.sample_every_nimg)),
            evaluate=self.eval_every_nimg > 0 and (last or every(self.eval_every_nimg)),
            checkpoint=last or every(self.ckpt_every_nimg),
        )
