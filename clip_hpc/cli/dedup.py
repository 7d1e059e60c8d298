"""`clip-hpc dedup EMB_DIR --threshold S --out DIR`: the subcommand's arguments and its handler (thin: it calls
`dedup_embeddings`). Importing this module loads neither numpy nor FAISS, so `clip-hpc --help` stays quick."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def cmd_dedup(args: argparse.Namespace) -> int:
    from clip_hpc.cluster.jobenv import job_env, use_threads
    from clip_hpc.cluster.world import speaks_for_job, world

    threads = job_env().threads_per_rank(world().local_size)  # this rank's share of the node's CPUs
    if "numpy" not in sys.modules:  # BLAS sizes its pool once, when numpy loads; an oversubscribed pool crawls
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    use_threads(faiss_threads=threads)
    from clip_hpc.subsets.dedup import DedupOptions, dedup_embeddings

    result = dedup_embeddings(
        DedupOptions(
            emb_dir=Path(args.emb_dir),
            out=Path(args.out),
            threshold=args.threshold,
            partitions=args.partitions,
            seed=args.seed,
            border=args.border,
        )
    )
    if speaks_for_job(world()):
        counts = result.counts
        if result.already_done:
            print(f"{args.out}: already done ({counts.duplicates} duplicates in {counts.groups} groups); nothing to do")
        else:
            print(
                f"{counts.vectors} vectors: {counts.duplicates} duplicates in {counts.groups} groups at cosine >= "
                f"{result.settings.threshold} ({result.partitions.count} partitions, {result.replication:.2f} "
                f"memberships per vector, {result.ranks} rank(s)) in {result.timings.get('total', 0.0):.1f} s "
                f"-> {Path(args.out) / 'duplicates.parquet'}"
            )
    return 0


def add_dedup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dedup",
        help="find semantic near-duplicates in an EMB_DIR (k-means partitions, exact pairs, all ranks)",
        description="Group the images of EMB_DIR whose embeddings have cosine >= --threshold (connected components "
        "of those pairs) and list every image but the lowest id of each group in DIR/duplicates.parquet "
        "(id, duplicate_of, similarity, path, duplicate_of_path); counts and timings in DIR/dedup.json. "
        "Exact pairs in k-means partitions, each vector also in the partitions whose border it is near "
        "(--border). Run it under "
        "mpiexec -n N or srun --mpi=pmi2 to spread the partitions over ranks; a killed run resumes.",
    )
    p.add_argument("emb_dir", help="an EMB_DIR made by clip-hpc embed (every unit whole)")
    p.add_argument("--threshold", type=float, required=True, help="cosine similarity at or above which two "
                   "images are near-duplicates, e.g. 0.95")  # fmt: skip
    p.add_argument("--out", required=True, help="DIR for duplicates.parquet and dedup.json (work files in DIR/work)")
    p.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="k-means partitions (default: about sqrt(vectors) or twice that, whichever costs less on the k-means "
        "sample); more: smaller exact searches, more copies at borders",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means sample and training")
    p.add_argument(
        "--border",
        choices=["auto", "exact"],
        default="auto",
        help="how near a partition border a vector must be to join the partition beyond it: auto (default) twice "
        "the margin the k-means sample's closest pairs need (47k real photos at 0.95: 3 partitions per vector "
        "instead of 127, every pair found), or exact, sqrt(2 - 2S), which can lose no pair",
    )
    p.set_defaults(func=cmd_dedup)
