#!/usr/bin/env python
"""Synthetic CLIP-like vectors as an EMB_DIR, for index tests and benchmarks (see clip_hpc.devdata.synthetic_vectors).

make_synthetic_vectors.py OUT -n 200000 --dim 512 [--clusters 1000] [--shard-size 50000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clip_hpc.devdata.synthetic_vectors import gaussian_mixture, write_emb_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vectors, labels = gaussian_mixture(args.n, args.dim, args.clusters, seed=args.seed)
    write_emb_dir(args.out, vectors, labels, args.shard_size)
    print(json.dumps({"out": str(args.out), "n": args.n, "dim": args.dim, "clusters": args.clusters}))


if __name__ == "__main__":
    main()
