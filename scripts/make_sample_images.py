#!/usr/bin/env python3
"""Make N varied sample images in real formats and sizes, for tests, the demo and benchmarks; `--bad` also writes
one file of each awkward kind under OUT/bad. The writers live in clip_hpc.sample_images.

    make_sample_images.py OUT [-n 300] [--seed 0] [--photos] [--bad]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clip_hpc.sample_images import write_bad_images, write_samples


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photos", action="store_true", help="mix in the real photos bundled with scikit-image")
    ap.add_argument("--bad", action="store_true", help="also write one file of each awkward kind under OUT/bad")
    args = ap.parse_args(argv)
    written = write_samples(args.out, args.n, args.seed, args.photos)
    report = {"out": str(args.out), "written": len(written)}
    if args.bad:
        report["bad"] = write_bad_images(args.out / "bad")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
