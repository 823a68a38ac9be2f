"""A run's resumable state and its checkpoint: what the loop saves, what ``--resume`` restores.

The state of a run after step ``s`` is: the network, the objective's trained state (loss-term
parameters), the optimizer, every EMA, and the partial log window. Batches, noise and
dropout are functions of ``(seed, step, shard)``, so nothing else is needed for the resumed
run to equal the uninterrupted one bit for bit.

Under ``strategy: fsdp`` (``Trainer.parallel.sharded``) every rank writes its slices into a
sharded checkpoint folder (``train.sharded``) and reads back only its slices, at any world
size; a checkpoint of either kind resumes a run of either strategy (whole tensors are cut
into this rank's slices, sharded folders are read whole for DDP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from denoiselab.config import ConfigError
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train import sharded
from denoiselab.train.checkpoint import Checkpoint, CheckpointError, CheckpointWriteError
from denoiselab.train.distributed import DistInfo


def save(trainer: Any, step: int) -> Path | None:
    """Checkpoint ``trainer`` after ``step`` steps. Rank 0 writes (under FSDP every rank
    writes its slices); all ranks learn whether it succeeded (a collective, which also keeps
    them in step) and raise the same :class:`CheckpointWriteError` if not."""
    path, error = None, None
    window_tensors, window_fields = trainer.window.state(trainer.dist)  # every rank's sums
    parts = dict(
        config_yaml=trainer.config_yaml,
        ema={d: trainer.ema.state(d) for d in trainer.ema.decays},
        optimizer=trainer.optimizer.state_dict(),
        state_tensors=window_tensors,
        loop_state={
            "step": step,
            "nimg": step * trainer.cfg.global_batch,
            "window": window_fields,
            "world_size": trainer.dist.world_size,
            "strategy": trainer.parallel.name,
        },
    )
    if trainer.parallel.sharded:  # the live shards, as DTensors: each rank writes its own
        c = ckpt_io.contents(
            step, model=trainer.model.state_dict(), objective=trainer.objective.state_dict(),
            **parts,
        )  # fmt: skip
        return sharded.save(trainer.run_dir.checkpoints, c, trainer.dist,
                            keep=trainer.cfg.keep_checkpoints)  # fmt: skip
    if trainer.dist.is_main:
        try:
            path = ckpt_io.save_checkpoint(
                trainer.run_dir.checkpoints,
                step,
                model=ckpt_io.state_dict_cpu(trainer.model),
                objective=ckpt_io.state_dict_cpu(trainer.objective),
                keep=trainer.cfg.keep_checkpoints,
                **parts,
            )
        except CheckpointWriteError as e:
            error = e
    _agree(trainer.dist, trainer.device, error, step)
    return path


def consolidate_newest(trainer: Any) -> Path | None:
    """Under FSDP, at the end of a run: the newest sharded checkpoint also as the usual
    safetensors pair (rank 0 reads it back whole; ``sample``/``eval``/``export`` read the
    pair). Nothing is deleted beyond the usual retention."""
    if not trainer.dist.is_main:
        return None
    found = [p for p in ckpt_io.list_checkpoints(trainer.run_dir.checkpoints) if p.is_dir()]
    if not found:
        return None
    pair = found[-1].with_name(found[-1].name.replace(".dcp", ".safetensors"))
    if pair.exists():
        return pair
    path = sharded.consolidate(found[-1], keep=trainer.cfg.keep_checkpoints)
    trainer.log(f"consolidated {found[-1].name} → {path.name}")
    return path


def _agree(dist: DistInfo, device: torch.device, error: Exception | None, step: int) -> None:
    failed = error is not None
    if dist.enabled:
        flag = torch.tensor([int(failed)], device=device)
        torch.distributed.broadcast(flag, src=0)
        failed = bool(flag.item())
    if error is not None:
        raise error
    if failed:
        raise CheckpointWriteError(f"rank 0 could not write the checkpoint of step {step}")


def resume(trainer: Any, source: str | Path | Checkpoint) -> int:
    """Restore ``trainer`` from ``source`` (a run folder: its newest checkpoint that loads,
    each newer unreadable one reported in one line; a file; a loaded checkpoint); returns
    the step to continue from."""
    warn = lambda m: trainer.log(f"warning: {m}")  # noqa: E731
    if isinstance(source, Checkpoint):
        ck = source
    else:
        ck = ckpt_io.load_for_resume(source, warn=warn)
    while ck.sharded:  # its tensors are read now (each rank its slices), files verified
        try:
            ck = sharded.load(ck.path, live_tensors(trainer), trainer.dist)
        except CheckpointError as e:  # every rank got the same error (a collective check)
            if not ck.from_folder:  # a checkpoint named explicitly must load
                raise
            older = ckpt_io.load_for_resume(ck.path.parent, warn=warn, before=ck.step)
            warn(f"{e}; resuming from the previous checkpoint {older.path.name} instead")
            ck = older
    step = restore(trainer, ck)
    _same_on_all_ranks(trainer.dist, trainer.device, step)
    trainer.log(f"resumed from {ck.path} at step {step}")
    return step


def live_tensors(trainer: Any) -> dict[str, Tensor]:
    """The run's live tensors by checkpoint name (``model.*``, ``ema.<decay>.*``,
    ``objective.*``, and ``optim.<pid>``: parameter ``pid`` of the optimizer, whose state
    has its placement): where a checkpoint's tensors go."""
    like = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    for decay in trainer.ema.decays:
        like.update({f"ema.{decay!r}.{k}": v for k, v in trainer.ema.state(decay).items()})
    like.update({f"objective.{k}": v for k, v in trainer.objective.state_dict().items()})
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    like.update({f"optim.{pid}": p for pid, p in enumerate(params)})  # state_dict's numbering
    return like


def _localise(trainer: Any, ck: Checkpoint) -> None:
    """Cut the whole tensors of ``ck`` into this rank's slices where the run is sharded
    (no communication: every rank holds the whole checkpoint)."""
    if not trainer.parallel.sharded:
        return
    like, cut = live_tensors(trainer), trainer.parallel.shard_like
    ck.model = {k: cut(v, like.get(f"model.{k}")) for k, v in ck.model.items()}
    ck.objective = {k: cut(v, like.get(f"objective.{k}")) for k, v in (ck.objective or {}).items()}
    ck.ema = {
        d: {k: cut(v, like.get(f"ema.{d!r}.{k}")) for k, v in params.items()}
        for d, params in ck.ema.items()
    }
    if ck.optimizer is not None:
        for pid, st in ck.optimizer["state"].items():
            for key, value in st.items():
                if isinstance(value, Tensor):
                    st[key] = cut(value, like.get(f"optim.{pid}"))


def _same_on_all_ranks(dist: DistInfo, device: torch.device, step: int) -> None:
    """Every rank reads the checkpoint itself; one that fell back to an older one (a read
    error on its side only) would train other steps than the rest: refuse."""
    if not dist.enabled:
        return
    lo_hi = torch.tensor([-step, step], device=device)
    torch.distributed.all_reduce(lo_hi, op=torch.distributed.ReduceOp.MAX)
    lo, hi = -int(lo_hi[0]), int(lo_hi[1])
    if lo != hi:
        raise CheckpointError(
            f"the ranks resumed from different checkpoints (steps {lo} to {hi}): some could "
            "not read the newest one; check the file system and resume again"
        )


def claim_run_folder(trainer: Any, resuming: bool) -> None:
    """A fresh run never mixes with another's checkpoints (a named error); a resumed one
    sets aside the checkpoints newer than its start (another history, or unreadable)."""
    run_dir = trainer.run_dir
    if not trainer.dist.is_main:
        return
    found = ckpt_io.list_checkpoints(run_dir.checkpoints)
    if found and not resuming:
        raise ConfigError(
            f"{run_dir.root} already holds a run (checkpoints up to {found[-1].name}): "
            f"continue it with --resume {run_dir.root} (or --auto-resume), or train into "
            "another --out"
        )
    moved = ckpt_io.set_aside_after(run_dir.checkpoints, trainer.start_step)
    if moved:
        trainer.log(
            f"warning: set aside {len(moved)} file(s) newer than step {trainer.start_step} "
            f"as *.stale in {run_dir.checkpoints}"
        )


def _same_vocabulary(trainer: Any, ck: Checkpoint) -> None:
    """A ``words`` text run numbers its words in sorted order, so captions with other words
    shift the ids: resuming would read every embedding row as another word's, silently when
    the count stays the same. The checkpoint records its vocabulary: a change is refused,
    naming the words that came and went."""
    text = getattr(trainer.model_cfg, "text", None)
    if text is None or text.encoder != "words":
        return
    saved = (yaml.safe_load(ck.config_yaml or "") or {}).get("resolved_model") or {}
    before = tuple((saved.get("text") or {}).get("vocab") or ())
    if not before or before == text.vocab:
        return
    added, removed = sorted(set(text.vocab) - set(before)), sorted(set(before) - set(text.vocab))
    raise CheckpointError(
        f"{ck.path}: this run's caption vocabulary differs from the checkpoint's "
        f"({len(before)} → {len(text.vocab)} words; added {added or 'none'}, removed "
        f"{removed or 'none'}): its word embeddings would be read as other words. Resume "
        "with the captions the run was trained on (the checkpoint's config.yaml records "
        "them as resolved_model.text.vocab)"
    )


def restore(trainer: Any, ck: Checkpoint) -> int:
    """Load ``ck`` into ``trainer`` (network, loss terms, optimizer, EMAs, log window);
    returns its step. A checkpoint that does not fit this run is a named error."""
    _same_vocabulary(trainer, ck)
    _localise(trainer, ck)
    try:
        trainer.model.load_state_dict(ck.model)
    except RuntimeError as e:
        raise CheckpointError(f"{ck.path}: its network does not match this run's ({e})") from e
    try:
        trainer.objective.load_state_dict(ck.objective or {})
    except RuntimeError as e:
        raise CheckpointError(
            f"{ck.path}: the loss terms' state does not match this run's objective ({e})"
        ) from e
    try:
        trainer.optimizer.load_state_dict(ck.optimizer)
    except ValueError as e:
        raise CheckpointError(
            f"{ck.path}: its optimizer state does not match this run's parameters ({e})"
        ) from e
    for decay in trainer.cfg.ema.decays:
        if decay not in ck.ema:
            raise CheckpointError(f"{ck.path}: no EMA with decay {decay} (has {sorted(ck.ema)})")
        trainer.ema.load(decay, ck.ema[decay])
    trainer.window.load(ck.state_tensors or {}, ck.loop_state.get("window", {}), trainer.dist)
    return ck.step
