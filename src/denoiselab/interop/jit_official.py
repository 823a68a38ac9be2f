"""``denoiselab convert jit-official CKPT.pth --out RUN``: an official JiT checkpoint as a run.

The official training script (``main_jit.py`` → ``util/misc.py: save_model``) writes
``torch.save({"model", "optimizer", "epoch", "args", "model_ema1", "model_ema2"})``: the
``Denoiser``'s state dict (the network under ``net.``), the AdamW state (two parameter groups:
1-D tensors and biases without weight decay, the rest with it), the last finished epoch, the
``argparse.Namespace`` of the run, and two EMA copies of the state dict (decays
``args.ema_decay1`` = 0.9999 and ``args.ema_decay2`` = 0.9996 by default).

The file is read with ``torch.load(weights_only=True)``; ``argparse.Namespace`` is the one
class allowed besides tensors and containers (``torch.serialization.safe_globals``), so a file
holding any other object is refused, never unpickled. The result is a normal run folder:
``config.yaml`` (the run's recipe in denoiselab terms, ``resolved_model`` included), one
checkpoint ``checkpoints/step_<S>.safetensors`` with the weights, both EMA copies and the AdamW
moments mapped onto denoiselab's parameter order, and ``convert.json`` recording the source,
the official args and every assumption made. ``sample``, ``eval`` and ``train --resume`` accept
it like any run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from denoiselab.config import ConfigError, apply_overrides, from_dict
from denoiselab.interop import ConvertError
from denoiselab.interop import official_layout as layout
from denoiselab.models import MODEL_PRESETS, JiTConfig
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.config import TrainConfig

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k train: what the official runs iterate over
REQUIRED = ("model", "model_ema1", "model_ema2", "args")
# main_jit.py's argparse defaults, used (and recorded) for any field a fork's args lack.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "model": "JiT-B/16",
    "img_size": 256,
    "attn_dropout": 0.0,
    "proj_dropout": 0.0,
    "epochs": 200,
    "warmup_epochs": 5,
    "batch_size": 128,
    "world_size": 1,
    "lr": None,
    "blr": 5e-5,
    "lr_schedule": "constant",
    "weight_decay": 0.0,
    "ema_decay1": 0.9999,
    "ema_decay2": 0.9996,
    "P_mean": -0.8,
    "P_std": 0.8,
    "noise_scale": 1.0,
    "t_eps": 5e-2,
    "label_drop_prob": 0.1,
    "seed": 0,
    "sampling_method": "heun",
    "num_sampling_steps": 50,
    "cfg": 1.0,
    "interval_min": 0.0,
    "interval_max": 1.0,
    "class_num": 1000,
    "data_path": "./data/imagenet",
}


def load_official(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded without unpickling anything but tensors, containers and
    ``argparse.Namespace``; ``args`` becomes a plain dict. Missing parts are named."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{str(path)!r} does not exist (expected an official checkpoint-*.pth)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), …
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it refers to {found.group(1)!r}" if found else str(e).splitlines()[0]
        raise ConvertError(
            f"{str(path)!r} cannot be read with torch.load(weights_only=True): {why}. Only "
            "tensors, containers and argparse.Namespace are accepted; nothing else is unpickled"
        ) from None
    if not isinstance(ckpt, dict):
        raise ConvertError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ConvertError(
            f"{str(path)!r} lacks {missing}; an official JiT checkpoint has keys "
            f"{list(REQUIRED)} (+ 'optimizer', 'epoch'); found {sorted(ckpt)}"
        )
    args = ckpt["args"]
    ckpt["args"] = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return ckpt


class _Args:
    """The official args with the script's defaults for missing fields (each one recorded)."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self.values, self.defaulted = dict(args), []

    def __getitem__(self, key: str) -> Any:
        if key in self.values and self.values[key] is not None:
            return self.values[key]
        if key not in self.values:
            self.defaulted.append(key)
        return OFFICIAL_DEFAULTS[key]


def model_config_from(
    state: Mapping[str, Tensor], args: _Args, in_context_start: int | None
) -> JiTConfig:
    """The network of the checkpoint: shapes from the weights, the rest from the model name."""
    name = args["model"]
    if in_context_start is None:
        if "in_context_posemb" in state and name not in MODEL_PRESETS:
            raise ConvertError(
                f"args.model={name!r} is not a JiT size denoiselab knows, and the in-context "
                "start block is not in the weights: pass --in-context-start K"
            )
        in_context_start = MODEL_PRESETS.get(name, {}).get("in_context_start", 0)
    cfg = layout.infer_config(
        state,
        in_context_start=in_context_start,
        image_size=args["img_size"],
        dropout=float(args["proj_dropout"]),
    )
    if cfg.num_classes != args["class_num"]:
        raise ConvertError(
            f"args.class_num={args['class_num']} but y_embedder.embedding_table.weight has "
            f"{cfg.num_classes} + 1 rows"
        )
    return cfg


def steps_per_epoch(args: _Args, train_images: int) -> int:
    """Optimizer steps of one official epoch: DistributedSampler pads to ``ceil(N / W)`` per
    rank and the loader drops the last partial batch of ``batch_size``."""
    world = int(args["world_size"])
    return -(-train_images // world) // int(args["batch_size"])


def train_config_from(
    args: _Args, model_cfg: JiTConfig, train_images: int, overrides: Sequence[str]
) -> TrainConfig:
    """The official run's recipe as a :class:`TrainConfig` (then ``key=value`` overrides)."""
    global_batch = int(args["batch_size"]) * int(args["world_size"])
    lr = args.values.get("lr") or args["blr"] * global_batch / 256
    decays = list(dict.fromkeys([float(args["ema_decay1"]), float(args["ema_decay2"])]))
    # the official code has no token routing: the network's fields but that one
    fields = {k: v for k, v in vars(model_cfg).items() if k != "routing"}
    data = {
        "name": "imagefolder",
        "root": str(Path(args["data_path"]) / "train"),  # main_jit.py reads <data_path>/train
        "image_size": model_cfg.image_size,
    }
    base = {
        "data": data,
        "model": {
            "name": args["model"] if args["model"] in MODEL_PRESETS else "JiT-B/16",
            **fields,
        },
        "objective": {
            "prediction": "x",
            "loss_space": "v",
            "t_eps": float(args["t_eps"]),
            "noise_scale": float(args["noise_scale"]),
            "time": {"kind": "logit_normal", "mu": args["P_mean"], "sigma": args["P_std"]},
            "label_drop": float(args["label_drop_prob"]),
        },
        "optim": {
            "lr": float(lr),
            "base_lr": float(args["blr"]),
            "betas": [0.9, 0.95],
            "weight_decay": float(args["weight_decay"]),
            "warmup_epochs": float(args["warmup_epochs"]),
        },
        "ema": {"decays": decays, "warmup": False},
        "sample": {
            "steps": int(args["num_sampling_steps"]),
            "solver": args["sampling_method"],
            "cfg": float(args["cfg"]),
            "interval": [float(args["interval_min"]), float(args["interval_max"])],
        },
        "seed": int(args["seed"]),
        "global_batch": global_batch,
        "duration_nimg": int(args["epochs"]) * steps_per_epoch(args, train_images) * global_batch,
    }
    try:
        return from_dict(TrainConfig, apply_overrides(base, list(overrides)))
    except ConfigError as e:
        raise ConvertError(f"the converted config is invalid: {e}") from e


def official_param_order(state: Mapping[str, Tensor]) -> list[str]:
    """Trainable parameters in ``named_parameters()`` order: ``state_dict`` order minus the
    frozen ``pos_embed`` and the RoPE buffers."""
    return [k for k in state if not layout.DERIVED.match(k)]


def convert_optimizer(
    optimizer: Mapping[str, Any] | None,
    official_order: list[str],
    our_shapes: Mapping[str, tuple[int, ...]],
    group: dict[str, Any],
) -> tuple[dict[str, Any], str]:
    """The official AdamW state on denoiselab's single parameter group, or an empty state
    (a fresh optimizer) with the reason. Official ids: ``add_weight_decay`` puts 1-D tensors
    and biases first (no decay), then the rest, each in ``named_parameters`` order."""
    fresh = {"state": {}, "param_groups": [{**group, "params": list(range(len(our_shapes)))}]}
    if not optimizer or "state" not in optimizer or "param_groups" not in optimizer:
        return fresh, "no optimizer state in the checkpoint: Adam moments start at zero"
    shapes = {layout.official_name(k): s for k, s in our_shapes.items()}
    no_decay = [n for n in official_order if len(shapes.get(n, ())) == 1 or n.endswith(".bias")]
    by_group = [no_decay, [n for n in official_order if n not in set(no_decay)]]
    groups = optimizer["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g) for g in by_group]:
        return fresh, (
            f"optimizer groups hold {[len(g['params']) for g in groups]} parameters, the official "
            f"layout {[len(g) for g in by_group]}: Adam moments start at zero"
        )
    ids = {n: pid for g, names in zip(groups, by_group) for pid, n in zip(g["params"], names)}
    state: dict[int, dict[str, Any]] = {}
    for index, (ours, shape) in enumerate(our_shapes.items()):
        entry = optimizer["state"].get(ids[layout.official_name(ours)])
        if entry is None:
            continue  # a parameter that never received a gradient
        moments = [entry.get("exp_avg"), entry.get("exp_avg_sq")]
        if any(m is None or m.numel() != torch.Size(shape).numel() for m in moments):
            return fresh, f"optimizer moments of {ours!r} do not fit its shape: fresh moments"
        state[index] = {
            "step": entry["step"],
            "exp_avg": moments[0].reshape(shape).float(),
            "exp_avg_sq": moments[1].reshape(shape).float(),
        }
    return {"state": state, "param_groups": fresh["param_groups"]}, "converted"


def adamw_group(cfg: TrainConfig) -> dict[str, Any]:
    """The hyper-parameters of the trainer's one AdamW group (what ``--resume`` loads)."""
    from denoiselab.train.optim import build_optimizer

    probe = torch.nn.Linear(1, 1, bias=False)
    lr = cfg.optim.resolved_lr(cfg.global_batch)
    opt = build_optimizer(cfg.optim, probe, lr, torch.device("cpu"))
    return {k: v for k, v in opt.state_dict()["param_groups"][0].items() if k != "params"}


def convert(
    source: str | Path,
    out: str | Path,
    *,
    train_images: int = IMAGENET_TRAIN_IMAGES,
    in_context_start: int | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Write run folder ``out`` from official checkpoint ``source``; returns the weights file.

    ``train_images``: the size of the training set (ImageNet-1k by default), which turns the
    checkpoint's epoch into a step. ``overrides``: ``key=value`` changes of the converted
    config (e.g. ``data.root=/data/imagenet/train``).
    """
    from denoiselab.train.build import config_yaml_with_model
    from denoiselab.train.run import RunFolder

    out = Path(out)
    if ckpt_io.list_checkpoints(out / "checkpoints"):
        raise ConvertError(f"{str(out)!r} already holds checkpoints; choose another --out")
    ckpt = load_official(source)
    args = _Args(ckpt["args"])
    states = {}
    fused = False
    for key in ("model", "model_ema1", "model_ema2"):
        states[key] = layout.strip_prefixes(ckpt[key])
        fused |= layout.fuse_split_swiglu(states[key])
    model_cfg = model_config_from(states["model"], args, in_context_start)
    cfg = train_config_from(args, model_cfg, train_images, overrides)
    weights = {k: layout.to_denoiselab(s, model_cfg, where=k) for k, s in states.items()}
    decays = [float(args["ema_decay1"]), float(args["ema_decay2"])]
    ema = {decays[0]: weights["model_ema1"], decays[1]: weights["model_ema2"]}  # equal → one
    shapes = layout.expected_shapes(model_cfg)
    group = adamw_group(cfg)
    if fused:
        optimizer = {"state": {}, "param_groups": [{**group, "params": list(range(len(shapes)))}]}
        note = "mlp.w1/w2 were fused into w12; their Adam moments are not mapped: fresh moments"
    else:
        order = official_param_order(states["model"])
        optimizer, note = convert_optimizer(ckpt.get("optimizer"), order, shapes, group)
    epochs_done = int(ckpt.get("epoch", -1)) + 1
    step = epochs_done * steps_per_epoch(args, train_images)
    warnings = _warnings(args, note)
    config_yaml = config_yaml_with_model(cfg, model_cfg)
    run = RunFolder(out)
    path = ckpt_io.save_checkpoint(
        run.checkpoints,
        step,
        config_yaml=config_yaml,
        model=weights["model"],
        ema=ema,
        optimizer=optimizer,
        loop_state={"step": step, "nimg": step * cfg.global_batch, "epoch": epochs_done},
        keep=cfg.keep_checkpoints,
    )
    run.write_text("config.yaml", config_yaml)
    record = {
        "source": str(Path(source).resolve()),
        "format": "jit-official",
        "epochs_done": epochs_done,
        "steps_per_epoch": steps_per_epoch(args, train_images),
        "train_images": train_images,
        "step": step,
        "ema": {"model_ema1": decays[0], "model_ema2": decays[1]},
        "optimizer": note,
        "defaults_used": args.defaulted,
        "warnings": warnings,
        "official_args": {k: v for k, v in ckpt["args"].items() if _plain(v)},
    }
    run.write_text("convert.json", json.dumps(record, indent=2) + "\n")
    run.write_meta({"converted_from": record["source"]})
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return path


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _warnings(args: _Args, optimizer_note: str) -> list[str]:
    """What the converted run does differently from the official one when training resumes
    (sampling and evaluation are unaffected: the network is the same function)."""
    out = []
    if float(args["attn_dropout"]) > 0:
        out.append(
            f"args.attn_dropout={args['attn_dropout']}: denoiselab has no dropout on attention "
            "probabilities (its dropout acts on the attention output and the MLP hidden layer)"
        )
    if args["lr_schedule"] != "constant":
        out.append(
            f"args.lr_schedule={args['lr_schedule']!r}: resumed training uses denoiselab's "
            "constant rate after warm-up (optim.cooldown for a linear decay)"
        )
    if float(args["weight_decay"]) > 0:
        out.append(
            "args.weight_decay > 0: denoiselab decays every parameter; the official code exempts "
            "biases and 1-D parameters"
        )
    if optimizer_note != "converted":
        out.append(optimizer_note)
    if args.defaulted:
        out.append(f"args lack {args.defaulted}; main_jit.py defaults were used")
    return out
