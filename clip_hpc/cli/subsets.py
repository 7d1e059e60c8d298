"""`clip-hpc filter`: parse, then `filter_subset`. Registered in clip_hpc/cli.py's REGISTRARS."""

from __future__ import annotations

import argparse
import sys

from clip_hpc.subsets.options import DEFAULT_SAMPLES_PER_TAR, OUTPUT_KINDS, PAGE_CACHE_CHOICES


def cmd_filter(args: argparse.Namespace) -> int:
    from clip_hpc.cluster.jobenv import job_env, use_threads
    from clip_hpc.cluster.world import world
    from clip_hpc.ingest.text import argv_text
    from clip_hpc.subsets.options import FilterOptions
    from clip_hpc.subsets.run import filter_subset

    w = world()
    use_threads(job_env().threads_per_rank(w.local_size))
    result = filter_subset(
        FilterOptions(
            source=args.source,
            out=args.out,
            texts=tuple(argv_text(t) for t in args.text),
            images=tuple(args.image),
            negatives=tuple(argv_text(t) for t in args.negative),
            threshold=args.threshold,
            top=args.top,
            min_caption_similarity=args.min_caption_similarity,
            to=tuple(args.to),
            dedup=args.dedup,
            samples_per_tar=args.samples_per_tar,
            device=args.device,
            page_cache=args.page_cache,
            progress=not args.quiet,
        ),
        w,
    )
    if not result.complete:
        return 1  # like embed: the outputs come from the rank that finishes last
    if w.is_root:
        kind = "exact" if result.exact else "approximate (index preview)"
        tars = f", {result.n_tars} tars" if "tars" in args.to else ""
        print(
            f"clip-hpc filter: kept {result.n_kept} of {result.n_scanned} images ({kind}){tars} "
            f"in {result.timings.get('total_s', 0.0):.1f} s -> {result.out}",
            file=sys.stderr,
        )
        if result.n_unusable:
            print(
                f"clip-hpc filter: {result.n_unusable} stored vectors have no direction (zero, NaN or infinite: "
                "re-embed their units) and were never kept; their ids are in filter.json",
                file=sys.stderr,
            )
        if result.n_samples_skipped:
            print(
                f"clip-hpc filter: {result.n_samples_skipped} images are not in the tars (gone, unreadable or changed "
                f"since embed): listed with the reason in {result.out}/skipped.parquet",
                file=sys.stderr,
            )
        if "members.txt" in result.files:
            print(
                "clip-hpc filter: tar members are in members.txt (TARPATH::MEMBER), which `embed --file-list` "
                "cannot take; paths.txt holds the loose files and URLs, --to tars the whole subset",
                file=sys.stderr,
            )
    return 0


def add_filter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "filter",
        help="extract the subset matching text/image queries from an EMB_DIR (exact, MPI) or INDEX_DIR (preview)",
    )
    p.add_argument("source", help="EMB_DIR (exact scan on every rank) or INDEX_DIR (fast approximate preview)")
    p.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    p.add_argument("--text", action="append", default=[], help="a positive text query (repeatable)")
    p.add_argument("--image", action="append", default=[], help="a positive query image file (repeatable)")
    p.add_argument("--negative", action="append", default=[], help="a negative text query (repeatable)")
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--threshold", type=float, help="keep images whose best positive cosine is >= S")
    keep.add_argument("--top", type=int, help="keep the N best images (equal scores: the lower id)")
    p.add_argument(
        "--min-caption-similarity",
        type=float,
        default=None,
        help="also require the image-caption cosine recorded by `embed --captions` to be >= S",
    )
    p.add_argument(
        "--dedup",
        type=float,
        metavar="S",
        help="drop near-duplicates within the subset (cosine >= S), keeping each group's lowest id",
    )
    p.add_argument("--to", action="append", default=[], choices=OUTPUT_KINDS, help="also write: tars, urls")
    p.add_argument("--samples-per-tar", type=int, default=DEFAULT_SAMPLES_PER_TAR)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--page-cache",
        default="auto",
        choices=PAGE_CACHE_CHOICES,
        help="read the shards through the page cache (use) or what it lacks straight from the disk (bypass, O_DIRECT: "
        "less CPU, nothing cached for the next run); auto: bypass when the vectors exceed half the memory",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_filter)
