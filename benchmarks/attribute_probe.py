#!/usr/bin/env python
"""Train the compositional score's attribute probe (default recipe) and report its held-out
per-attribute accuracy on real ``shapes`` images, its CPU time and the real-image ceiling of
the score on a held-out prompt set.

    PYTHONPATH=src nice -n 10 python benchmarks/attribute_probe.py --difficulty easy \\
        --holdout "red triangle" "blue circle" "yellow star"

One intra-op thread; the probe is trained afresh (not read from the cache) so the CPU time is
the training cost. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from denoiselab.data import DataConfig
from denoiselab.metrics.attribute_probe import (
    AttributeNet,
    AttributeProbe,
    AttributeProbeConfig,
    fit_attribute_probe,
)
from denoiselab.metrics.compositional import compositional_score, real_images, shapes_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--difficulty", choices=("hard", "easy"), default="easy")
    parser.add_argument("--holdout", nargs="*", default=None, help="'<colour> <shape>' pairs")
    parser.add_argument("--prompts", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = DataConfig(difficulty=args.difficulty, holdout_pairs=tuple(args.holdout or ()) or None)
    config = AttributeProbeConfig()
    cpu, wall = time.process_time(), time.perf_counter()
    net, meta = fit_attribute_probe(data, config)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert isinstance(net, AttributeNet)
    probe = AttributeProbe(net, meta, torch.device("cpu"))
    prompts = shapes_prompts(data, args.prompts, seed=0)
    lookup = {p.prompt: p for p in prompts}
    ceiling = compositional_score(
        lambda texts, seed: real_images([lookup[t] for t in texts], data.image_size),
        prompts,
        probe=probe,
        judged=tuple(probe.names),
    )
    print(
        json.dumps(
            {
                "difficulty": args.difficulty,
                "holdout": args.holdout,
                "val_accuracy": meta["val_accuracy"],
                "val_all_correct": meta["val_all_correct"],
                "train_cpu_s": round(cpu, 1),
                "train_wall_s": round(wall, 1),
                "real_prompts": {
                    "num": ceiling["num"],
                    "num_unseen": ceiling["num_unseen"],
                    "accuracy": {k: round(v, 3) for k, v in ceiling["accuracy"].items()},
                    "all_correct": round(ceiling["all_correct"], 3),
                    "unseen_all_correct": ceiling["unseen"]
                    and round(ceiling["unseen"]["all_correct"], 3),
                },
                "load": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
