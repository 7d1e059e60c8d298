#!/usr/bin/env python
"""Held-out recall check (see clip_hpc.bench.heldout): make a synthetic EMB_DIR with randomly drawn mixture parameters,
or measure an INDEX_DIR's served recall@10 on fresh text-like and in-distribution queries against its claim.

    heldout_recall.py make OUT -n 100000 [--dim 512] [--seed 1] [--shard-size 50000]
                      [--clusters C] [--spread S] [--latent L] [--noise E]   (override the drawn mixture)
    heldout_recall.py eval INDEX_DIR [--queries 400] [--groups 8] [--seed 2024]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from clip_hpc.bench.heldout import evaluate, heldout_mixture_params
from clip_hpc.devdata.synthetic_vectors import gaussian_mixture, write_emb_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    make = sub.add_parser("make")
    make.add_argument("out", type=Path)
    make.add_argument("-n", type=int, default=100_000)
    make.add_argument("--dim", type=int, default=512)
    make.add_argument("--seed", type=int, default=1)
    make.add_argument("--shard-size", type=int, default=50_000)
    for name, kind in (("clusters", int), ("spread", float), ("latent", int), ("noise", float)):
        make.add_argument(f"--{name}", type=kind, default=None)
    ev = sub.add_parser("eval")
    ev.add_argument("index_dir", type=Path)
    ev.add_argument("--queries", type=int, default=400)
    ev.add_argument("--groups", type=int, default=8)
    ev.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    if args.cmd == "make":
        params = heldout_mixture_params(args.n, args.seed)
        params = replace(
            params,
            **{k: getattr(args, k) for k in ("clusters", "spread", "latent", "noise") if getattr(args, k) is not None},
        )
        vectors, labels = gaussian_mixture(
            args.n,
            args.dim,
            params.clusters,
            latent=params.latent,
            spread=params.spread,
            noise=params.noise,
            seed=args.seed,
        )
        write_emb_dir(args.out, vectors, labels, args.shard_size)
        print(json.dumps({"out": str(args.out), "n": args.n, "dim": args.dim, **asdict(params)}))
    else:
        print(json.dumps(evaluate(args.index_dir, args.queries, args.seed, args.groups)))


if __name__ == "__main__":
    main()
