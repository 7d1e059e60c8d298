"""The typed options of a filter run and its result; what of the options a resume must agree with (`Settings`)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from clip_hpc.errors import UserError

OUTPUT_KINDS = ("tars", "urls")
PAGE_CACHE_CHOICES = ("auto", "use", "bypass")
DEFAULT_SAMPLES_PER_TAR = 10_000


@dataclass(frozen=True)
class FilterOptions:
    """What `clip-hpc filter` was asked: the source, the queries and the rule that keeps an image."""

    source: str
    out: str
    texts: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    negatives: tuple[str, ...] = ()
    threshold: float | None = None
    top: int | None = None
    min_caption_similarity: float | None = None
    dedup: float | None = None  # drop near-duplicates (cosine >= this) within the subset, keeping the lowest id
    to: tuple[str, ...] = ()
    samples_per_tar: int = DEFAULT_SAMPLES_PER_TAR
    device: str = "auto"
    page_cache: str = "auto"  # shards read through it ("use"), around it ("bypass"), or auto (`goes_around_cache`)
    progress: bool = True

    def check(self) -> None:
        """One-line refusals for options that cannot make a subset."""
        if not self.texts and not self.images:
            raise UserError("give at least one positive query: --text T or --image PATH")
        if (self.threshold is None) == (self.top is None):
            raise UserError("give exactly one of --threshold S or --top N")
        for flag, texts in (("--text", self.texts), ("--negative", self.negatives)):
            if any(not text.strip() for text in texts):  # the tokenizer's start and end alone: a query of nothing
                raise UserError(f"{flag} is empty: give the words to look for")
        for flag, value in (("--threshold", self.threshold), ("--min-caption-similarity", self.min_caption_similarity)):
            if value is not None and not math.isfinite(value):
                raise UserError(f"{flag} must be a number, not {value}")
            if value is not None and not -1.0 <= value <= 1.0:  # no cosine lies outside: nothing or everything kept
                raise UserError(f"{flag} is a cosine in [-1, 1], not {value}")
        if self.top is not None and self.top < 1:
            raise UserError(f"--top must be at least 1, not {self.top}")
        if self.dedup is not None and not -1.0 < self.dedup <= 1.0:
            raise UserError(f"--dedup must be a cosine in (-1, 1], not {self.dedup}")
        if self.samples_per_tar < 1:
            raise UserError(f"--samples-per-tar must be at least 1, not {self.samples_per_tar}")
        if self.page_cache not in PAGE_CACHE_CHOICES:
            raise UserError(f"--page-cache {self.page_cache}: choose from {', '.join(PAGE_CACHE_CHOICES)}")
        unknown = [kind for kind in self.to if kind not in OUTPUT_KINDS]
        if unknown:
            raise UserError(f"--to {unknown[0]}: choose from {', '.join(OUTPUT_KINDS)}")
        for image in self.images:
            if not os.path.isfile(image):
                raise UserError(f"--image {image}: no such file")


@dataclass(frozen=True)
class Settings:
    """What every unit part in one output directory was made with; a re-run must ask for exactly this."""

    source: str
    source_inputs: str  # the sha256 of the source's inputs.txt (an EMB_DIR) or its index.json's `created` (INDEX_DIR)
    model: str
    pretrained: str
    texts: list[str]
    images: list[str]
    negatives: list[str]
    threshold: float | None
    top: int | None
    min_caption_similarity: float | None
    samples_per_tar: int
    exact: bool
    dedup: float | None = None

    @classmethod
    def of(cls, options: FilterOptions, source_inputs: str, model: str, pretrained: str, exact: bool) -> Settings:
        return cls(
            source=os.path.abspath(options.source),
            source_inputs=source_inputs,
            model=model,
            pretrained=pretrained,
            texts=list(options.texts),
            images=[os.path.abspath(p) for p in options.images],
            negatives=list(options.negatives),
            threshold=options.threshold,
            top=options.top,
            min_caption_similarity=options.min_caption_similarity,
            samples_per_tar=options.samples_per_tar,
            exact=exact,
            dedup=options.dedup,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """The names of the settings `recorded` (an earlier run's) holds otherwise."""
        return [name for name, value in self.to_dict().items() if recorded.get(name) != value]


@dataclass
class FilterResult:
    """What a run produced (on rank 0; other ranks get the same counts)."""

    out: str
    exact: bool
    n_scanned: int
    n_kept: int
    n_units: int
    n_units_skipped: int
    n_duplicates: int = 0  # dropped by --dedup
    n_tars: int = 0
    n_tars_skipped: int = 0  # tars a killed run had written already
    n_samples_skipped: int = 0  # images left out of the tars: gone or changed since embed (skipped.parquet)
    n_unusable: int = 0  # rows never kept: their stored vector has no direction (zero, NaN, infinite, not unit)
    unusable_ids: list[int] = field(default_factory=list)  # the first of them
    timings: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    complete: bool = True  # False on a rank that cannot talk to the others and finished before them


def goes_around_cache(choice: str, nbytes: int, memory: int) -> bool:
    """Whether a scan of `nbytes` reads around the page cache: `choice` "bypass" or "use", or "auto": when the bytes
    exceed half the memory, which then cannot keep them for the next run anyway (a scan of them evicts its own
    start), where a smaller collection stays cached for the next query."""
    if choice not in PAGE_CACHE_CHOICES:
        raise ValueError(f"page cache choice {choice!r}: one of {', '.join(PAGE_CACHE_CHOICES)}")
    return choice == "bypass" or (choice == "auto" and 2 * nbytes > memory)
