"""What the checkpoint checksums cost: save and load a JiT-B/16 checkpoint (weights, three EMA
copies, AdamW moments: ≈ 3.1 GB) and time the CRC-32 part alone.

    python benchmarks/checkpoint_checksum.py --out /tmp/ckpt-bench [--model JiT-B/16]

Prints one JSON line: sizes, seconds to save and to load (both including the checksums),
seconds of CRC-32 over the same bytes, and that as a fraction of save and load. Needs
≈ 4× the checkpoint size in RAM and 1× on disk under --out (deleted afterwards).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from denoiselab.models import JiT, model_config
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train import tensorfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="JiT-B/16")
    p.add_argument("--out", required=True, help="scratch folder (deleted afterwards)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = JiT(model_config(args.model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for q in model.parameters():
        q.grad = torch.randn_like(q)
    opt.step()  # creates the moments
    weights = ckpt_io.state_dict_cpu(model)
    ema = {d: {k: v.clone() for k, v in weights.items()} for d in (0.9996, 0.9998, 0.9999)}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        tic = time.perf_counter()
        path = ckpt_io.save_checkpoint(folder, 1, config_yaml="bench", model=weights, ema=ema,
                                       optimizer=opt.state_dict(), loop_state={"step": 1})  # fmt: skip
        save_s = time.perf_counter() - tic
        tic = time.perf_counter()
        ck = ckpt_io.load_checkpoint(path)
        load_s = time.perf_counter() - tic
        tensors = [*ck.model.values(), *(v for e in ck.ema.values() for v in e.values())]
        tensors += [v for s in ck.optimizer["state"].values() for v in s.values()
                    if isinstance(v, torch.Tensor)]  # fmt: skip
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        tic = time.perf_counter()
        for t in tensors:
            tensorfile.tensor_crc(t)
        crc_s = time.perf_counter() - tic
        files = sum(f.stat().st_size for f in folder.iterdir())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({
        "model": args.model, "checkpoint_GB": round(files / 1e9, 3),
        "tensor_GB": round(nbytes / 1e9, 3), "save_s": round(save_s, 2),
        "load_s": round(load_s, 2), "crc_s": round(crc_s, 2),
        "crc_GB_per_s": round(nbytes / 1e9 / crc_s, 2),
        "crc_share_of_save": round(crc_s / save_s, 3),
        "crc_share_of_load": round(crc_s / load_s, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
