"""An independent, minimal re-implementation of the official JiT network and its checkpoint.

Written for the tests from a reading of the official code (LTH14/JiT ``model_jit.py``,
``denoiser.py``, ``util/model_util.py``, ``util/misc.py``), not copied from it and not sharing
any code with denoiselab: module and parameter names follow the official ones so that
``state_dict()`` has the official keys and layout (``net.`` prefix, 1×1-conv ``proj2``, fused
``w12``, ``adaLN_modulation.1``, frozen ``pos_embed`` parameter, persistent RoPE buffers).
Time convention as in the official code: t = 1 is data.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Norm(nn.Module):  # RMSNorm with a `weight`, computed in float32
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (self.weight * h).to(x.dtype)


def pairwise_rotate(x):  # (x0, x1) -> (-x1, x0) for each adjacent channel pair
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)


class Rope(nn.Module):
    """EVA-style 2-D RoPE tables over half the head each: rows, then columns; `prefix`
    leading tokens get cos = 1, sin = 0. Buffers are persistent, as in the official file."""

    def __init__(self, half: int, grid: int, prefix: int) -> None:
        super().__init__()
        inv = 1.0 / (10000.0 ** (torch.arange(0, half, 2).float() / half))  # [half/2]
        ang = torch.arange(grid).float()[:, None] * inv[None]  # [grid, half/2]
        ang = ang.repeat_interleave(2, dim=-1)  # [grid, half], pairs share an angle
        rows = ang[:, None, :].expand(grid, grid, half)
        cols = ang[None, :, :].expand(grid, grid, half)
        full = torch.cat([rows, cols], dim=-1).reshape(grid * grid, 2 * half)
        cos = torch.cat([torch.ones(prefix, 2 * half), full.cos()])
        sin = torch.cat([torch.zeros(prefix, 2 * half), full.sin()])
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x):
        return x * self.freqs_cos + pairwise_rotate(x) * self.freqs_sin


class Attn(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = Norm(dim // heads)
        self.k_norm = Norm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        w = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(d // self.heads), -1)
        return self.proj((w.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, d))


class FFN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = int(int(dim * 4.0) * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, g = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * g)


def shift_scale(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = Norm(dim)
        self.attn = Attn(dim, heads)
        self.norm2 = Norm(dim)
        self.mlp = FFN(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + m[2][:, None] * self.attn(shift_scale(self.norm1(x), m[0], m[1]), rope)
        return x + m[5][:, None] * self.mlp(shift_scale(self.norm2(x), m[3], m[4]))


class Final(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = Norm(dim)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(shift_scale(self.norm_final(x), shift, scale))


class TEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000.0) * torch.arange(128).float() / 128)
        a = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([a.cos(), a.sin()], dim=-1))


class YEmbed(nn.Module):
    def __init__(self, classes: int, dim: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(classes + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)


class PatchIn(nn.Module):
    def __init__(self, p: int, c: int, bottleneck: int, dim: int) -> None:
        super().__init__()
        self.proj1 = nn.Conv2d(c, bottleneck, p, stride=p, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, dim, 1)

    def forward(self, x):
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


def sincos_table(dim: int, grid: int) -> np.ndarray:
    """MAE 2-D table: first half encodes the column (w), second the row (h); [sin, cos]."""

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1)


class OfficialJiT(nn.Module):
    def __init__(self, *, size, p, c, dim, depth, heads, bottleneck, classes, ctx_len, ctx_start):
        super().__init__()
        grid = size // p
        self.p, self.c, self.ctx_len, self.ctx_start = p, c, ctx_len, ctx_start
        self.t_embedder = TEmbed(dim)
        self.y_embedder = YEmbed(classes, dim)
        self.x_embedder = PatchIn(p, c, bottleneck, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim), requires_grad=False)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_table(dim, grid)).float()[None])
        if ctx_len:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, ctx_len, dim))
        self.feat_rope = Rope(dim // heads // 2, grid, 0)
        self.feat_rope_incontext = Rope(dim // heads // 2, grid, ctx_len)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final_layer = Final(dim, p * p * c)

    def forward(self, x, t, y):
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb
        h = self.x_embedder(x) + self.pos_embed
        for i, block in enumerate(self.blocks):
            if self.ctx_len and i == self.ctx_start:
                h = torch.cat(
                    [y_emb[:, None].repeat(1, self.ctx_len, 1) + self.in_context_posemb, h], 1
                )
            h = block(h, c, self.feat_rope if i < self.ctx_start else self.feat_rope_incontext)
        h = self.final_layer(h[:, self.ctx_len :], c)
        b, n, _ = h.shape
        g = int(n**0.5)
        h = h.reshape(b, g, g, self.p, self.p, self.c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(b, self.c, g * self.p, g * self.p)


class Denoiser(nn.Module):
    """Holds the network as `net`, like the official Denoiser (whose other fields are floats)."""

    def __init__(self, **arch) -> None:
        super().__init__()
        self.net = OfficialJiT(**arch)


def randomize(module: nn.Module, seed: int, std: float = 0.2) -> None:
    """Non-zero values everywhere (zero-initialised adaLN/outputs would hide mapping errors);
    the fixed tables are left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_embed"):
                continue
            base = 1.0 if name.endswith("norm1.weight") or "norm" in name.split(".")[-2] else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))


def add_weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The official parameter groups: 1-D tensors and biases without decay, then the rest."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def official_args(**fields) -> argparse.Namespace:
    base = dict(
        model="JiT-B/16",
        img_size=16,
        attn_dropout=0.0,
        proj_dropout=0.0,
        epochs=4,
        warmup_epochs=1,
        batch_size=4,
        world_size=2,
        lr=4e-4,
        blr=5e-5,
        min_lr=0.0,
        lr_schedule="constant",
        weight_decay=0.0,
        ema_decay1=0.9999,
        ema_decay2=0.9996,
        P_mean=-0.8,
        P_std=0.8,
        noise_scale=1.0,
        t_eps=0.05,
        label_drop_prob=0.1,
        seed=0,
        sampling_method="heun",
        num_sampling_steps=50,
        cfg=2.9,
        interval_min=0.1,
        interval_max=1.0,
        num_images=50000,
        class_num=8,
        data_path="/nonexistent/imagenet",
        output_dir="./out",
        resume="",
        gpu=0,
        distributed=True,
        dist_url="env://",
        dist_backend="nccl",
        rank=0,
        local_rank=-1,
        dist_on_itp=False,
        pin_mem=True,
        num_workers=12,
        start_epoch=0,
        online_eval=False,
        evaluate_gen=False,
        gen_bsz=256,
        eval_freq=40,
        save_last_freq=5,
        log_freq=100,
        device="cuda",
    )
    base.update(fields)
    return argparse.Namespace(**base)


def save_like_official(denoiser: Denoiser, ema1: dict, ema2: dict, optimizer, epoch, args, path):
    """`util/misc.py: save_model`: state dicts, optimizer, epoch, the args Namespace."""
    torch.save(
        {
            "model": denoiser.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "args": args,
            "model_ema1": ema1,
            "model_ema2": ema2,
        },
        path,
    )


# ------------------------------------------------------------------ a tiny official checkpoint

ARCH = dict(size=16, p=4, c=3, dim=64, depth=6, heads=4, bottleneck=8, classes=8, ctx_len=3)
ARCH["ctx_start"] = 4  # JiT-B's in-context start block, which the converter takes from the name


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, 16, 16, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.tensor([0, 3, 7, 8])[:n]  # 8 = the null class
    return z, t, y


def loss(net, seed):
    z, t, y = inputs(seed=seed)
    return net(z, t, y).pow(2).mean()


def make_official_checkpoint(tmp_path, **args_fields):
    """A trained-looking official checkpoint: random weights, 3 AdamW steps with the official
    parameter groups (non-trivial moments), two EMA copies that differ from the weights."""
    torch.manual_seed(0)
    den = Denoiser(**ARCH)
    randomize(den, seed=1)
    opt = torch.optim.AdamW(add_weight_decay_groups(den, 0.0), lr=1e-2, betas=(0.9, 0.95))
    for step in range(3):
        opt.zero_grad()
        loss(den.net, seed=10 + step).backward()
        opt.step()
    ema1, ema2 = den.state_dict(), den.state_dict()
    g = torch.Generator().manual_seed(5)
    for name, p in den.named_parameters():
        if p.requires_grad:
            ema1[name] = p.detach() + 0.05 * torch.randn(p.shape, generator=g)
            ema2[name] = p.detach() - 0.05 * torch.randn(p.shape, generator=g)
    path = tmp_path / "checkpoint-last.pth"
    save_like_official(den, ema1, ema2, opt, 1, official_args(**args_fields), path)
    return den, opt, path, (ema1, ema2)
