#!/usr/bin/env python3
"""Make N varied sample images in real formats and sizes, for tests, the demo and benchmarks; `--bad` also writes
one file of each awkward kind under OUT/bad. The writers live in clip_hpc.devdata.sample_images.

    make_sample_images.py OUT [-n 300] [--seed 0] [--photos] [--bad]
    make_sample_images.py OUT --tars 4 [-n 100]   # WebDataset tars of n captioned images each (jpg, txt, json)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clip_hpc.devdata.sample_images import write_bad_images, write_sample_tars, write_samples


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photos", action="store_true", help="mix in the real photos bundled with scikit-image")
    ap.add_argument("--bad", action="store_true", help="also write one file of each awkward kind under OUT/bad")
    ap.add_argument("--tars", type=int, default=0, help="write this many WebDataset tars of -n captioned images each")
    args = ap.parse_args(argv)
    if args.tars:
        tars = write_sample_tars(args.out, args.tars, args.n, args.seed)
        print(json.dumps({"out": str(args.out), "tars": len(tars), "per_tar": args.n}))
        return
    written = write_samples(args.out, args.n, args.seed, args.photos)
    report = {"out": str(args.out), "written": len(written)}
    if args.bad:
        report["bad"] = write_bad_images(args.out / "bad")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
