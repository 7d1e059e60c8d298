#!/usr/bin/env python
"""Train `clip-hpc-demo`, the small CLIP that ships with the package, on synthetic captioned shapes.

CPU only, seeded, a fixed number of steps (not wall time), so the same seed and thread count give the same
checkpoint bytes. The recipe lives in clip_hpc.devdata.demo_model; this is its command line.

    python scripts/train_demo_model.py                       # the shipped model (defaults below)
    python scripts/train_demo_model.py --steps 3 --train-size 256 --out /tmp/demo.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from clip_hpc.devdata import captioned_shapes as cs
from clip_hpc.devdata.demo_model import DEFAULT_OUT, checkpoint_bytes, evaluate, train
from clip_hpc.formats.atomic import atomic_write_bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--train-size", type=int, default=40000, help="images, generated once and kept in memory")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads; part of what makes the bytes repeat")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--eval-size", type=int, default=cs.HELDOUT_SIZE, help="held-out images to evaluate; 0: none")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, log = train(args.steps, args.batch_size, args.train_size, args.lr, args.seed)
    recipe = {k: v for k, v in log.items() if k not in ("data_s", "train_s", "final_loss")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, checkpoint_bytes(model, recipe))
    log["checkpoint"] = str(args.out)
    log["checkpoint_mb"] = round(args.out.stat().st_size / 2**20, 2)
    if args.eval_size:
        log["heldout"] = evaluate(str(args.out), args.eval_size)
    print(json.dumps(log, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
