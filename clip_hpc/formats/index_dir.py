"""INDEX_DIR, owned in one place: its file names, index.json as a typed `IndexInfo`, opening its files, and
building a new one beside it that is swapped in whole (an INDEX_DIR is absent, the old one or the new one).

FAISS loads only inside the methods that read or write the index, so `info` and the laptop side stay light.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import atomic_write_json, temp_path
from clip_hpc.formats.index_integrity import (
    DamagedIndex,
    check_mapped_lists,
    check_npy,
    check_recorded,
    check_sqlite,
    describe_file,
    describe_npy,
)
from clip_hpc.formats.index_swap import new_build_dir, put_in_place, recover_interrupted
from clip_hpc.formats.metadata import MetadataStore
from clip_hpc.formats.tier_codes import allocate_npy

if TYPE_CHECKING:
    import faiss

INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
META_FILE = "meta.sqlite"
INFO_FILE = "index.json"
TIER_FILE = "tier.faiss"  # the re-rank tier's trained quantizer (index/rerank_tier.py), when it pays
TIER_CODES_FILE = "tier_codes.npy"  # its codes, one row per global id
IVFDATA_FILE = "lists.ivfdata"  # on-disk inverted lists (a many-rank build's merge), memory-mapped when served
PARTS_DIR = "parts"  # a many-rank build's per-rank lists, only inside the build directory
INDEX_FORMAT = "clip-hpc-index"
ROW_LAYOUT = "global_id"  # vectors.npy row i is global id i; rows of failed (never embedded) ids are zero


@dataclass
class IndexInfo:
    """index.json. Known fields are typed; unknown keys ride along in `extra`, and a key an older index.json
    lacked stays absent until it is set, so `to_dict` gives back exactly what `from_dict` read."""

    index_key: str
    dim: int
    n: int = 0
    format: str = INDEX_FORMAT
    version: int = 1
    model: str | None = None
    pretrained: str | None = None
    nprobe: int | None = None
    refine: bool = True
    refine_factor: int | None = None
    row_layout: str = ROW_LAYOUT
    n_rows: int = 0
    unit_counts: dict[str, int] = field(default_factory=dict)
    unit_size: int | None = None
    emb_dir: str | None = None
    seed: int = 0
    created: str | None = None
    updates: list[dict[str, Any]] = field(default_factory=list)
    train_size: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    recall: dict[str, Any] = field(default_factory=dict)
    index_bytes: int | None = None
    bytes_per_vector: float | None = None  # index.faiss (and on-disk lists) per vector
    max_ram: int | None = None  # the --max-ram budget the build chose its tier within
    ram_bytes_per_vector: float | None = None  # what serving holds in RAM: index, lists, tier (not vectors.npy)
    disk_bytes_per_vector: float | None = None  # every file of the INDEX_DIR, vectors.npy and meta.sqlite included
    faiss_version: str | None = None
    ranks: int = 1  # processes that added vectors (a many-rank build merges their lists)
    lists: str = "memory"  # inverted lists in index.faiss ("memory") or in lists.ivfdata ("disk")
    vectors: str = "images"  # what the vectors embed: "images", or "captions" (`index --vectors captions`)
    tier: dict[str, Any] | None = None  # the re-rank tier when it pays: key, code_bytes, exact_factor
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> what it must be (index_integrity)
    extra: dict[str, Any] = field(default_factory=dict)
    absent: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("extra", "absent") or (f.name in self.absent and value == _default(f)):
                continue
            out[f.name] = value
        return dict(sorted(out.items()))  # the order index.json is written in

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexInfo:
        known = {f.name for f in fields(cls)} - {"extra", "absent"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
            absent=frozenset(known - set(data)),
        )


def _lists_into_memory(index: faiss.Index) -> faiss.Index:
    """Swap memory-mapped on-disk lists for in-memory ones, so adds never write into the served file."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    lists.merge_from(ivf.invlists, 0)  # an IVF index always has lists
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # SWIG ownership handle
    return index


def _default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _last_line(exc: BaseException) -> str:
    """What a FAISS error says, without the C++ function and source location it starts with."""
    lines = str(exc).strip().splitlines()
    text = lines[-1] if lines else type(exc).__name__
    return text.rsplit("failed: ", 1)[-1].rsplit("Error: ", 1)[-1][:200]


def _write_faiss(index: faiss.Index, path: Path) -> None:
    """faiss.write_index; a failed write (a full disk) is an OSError naming the file, as Python's own writes are."""
    import faiss

    try:
        faiss.write_index(index, str(path))
    except RuntimeError as exc:
        message = _last_line(exc)
        code = next((c for c in (errno.ENOSPC, errno.EDQUOT) if os.strerror(c) in message), errno.EIO)
        raise OSError(code, message if code == errno.EIO else os.strerror(code), str(path)) from None


class IndexDir:
    """An index directory: index.faiss (plus lists.ivfdata when merged on disk), vectors.npy, meta.sqlite and
    index.json, and nothing else names them."""

    FILES = (INDEX_FILE, VECTORS_FILE, META_FILE)

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"IndexDir({str(self.root)!r})"

    # --- paths ---
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    @property
    def vectors_path(self) -> Path:
        return self.root / VECTORS_FILE

    @property
    def meta_path(self) -> Path:
        return self.root / META_FILE

    @property
    def info_path(self) -> Path:
        return self.root / INFO_FILE

    @property
    def ivfdata_path(self) -> Path:
        return self.root / IVFDATA_FILE

    def has_ondisk_lists(self) -> bool:
        return self.ivfdata_path.is_file()

    @property
    def tier_path(self) -> Path:
        return self.root / TIER_FILE

    @property
    def tier_codes_path(self) -> Path:
        return self.root / TIER_CODES_FILE

    def has_tier(self) -> bool:
        return self.tier_path.is_file() and self.tier_codes_path.is_file()

    def remove_tier(self) -> None:
        """The self-check found the tier does not pay: neither RAM nor disk keeps it."""
        for path in (self.tier_path, self.tier_codes_path):
            path.unlink(missing_ok=True)

    def part_path(self, rank: int) -> Path:
        """Rank `rank`'s inverted lists before the merge (the parts folder is removed before the swap-in)."""
        return self.root / PARTS_DIR / f"rank-{rank:05d}.faiss"

    def looks_like_one(self) -> bool:
        """Whether `root` has an index.json (`info` and the demo tell an INDEX_DIR by it)."""
        return self.info_path.exists()

    # --- index.json ---
    def load_info(self) -> IndexInfo:
        """index.json, typed; a UserError that says what to do when it is missing, unreadable or foreign."""
        path = self.info_path
        if not self.root.exists():
            recover_interrupted(self.root)  # a build killed between moving the old index aside and renaming
        if not path.is_file():
            raise UserError(f"{self.root}: not an index directory (no {INFO_FILE}); build one with clip-hpc index")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable ({exc}); rebuild the index") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{path}: not a clip-hpc index (format={found!r})")
        try:
            return IndexInfo.from_dict(data)
        except TypeError as exc:
            raise UserError(f"{path}: unreadable ({exc}); rebuild the index") from None

    def write_info(self, info: IndexInfo) -> None:
        atomic_write_json(self.info_path, info.to_dict())

    def check_complete(self, info: IndexInfo | None = None) -> None:
        """Every data file present (and every file `info` recorded), or a UserError naming the first one missing."""
        for name in self.FILES + tuple(n for n in (info.files if info else {}) if n not in self.FILES):
            if not (self.root / name).is_file():
                raise UserError(f"{self.root}: {name} is missing; rebuild the index")

    def record_files(self, info: IndexInfo) -> None:
        """Put into `info` what each data file is now (size, end hashes, vectors.npy's shape, meta.sqlite's rows),
        for `check_integrity` to compare with when the index loads, and where the inverted lists are."""
        info.lists = "disk" if self.has_ondisk_lists() else "memory"
        names = (
            self.FILES
            + ((IVFDATA_FILE,) if self.has_ondisk_lists() else ())
            + ((TIER_FILE, TIER_CODES_FILE) if self.has_tier() else ())
        )
        info.files = {
            name: describe_npy(self.root / name) if name.endswith(".npy") else describe_file(self.root / name)
            for name in names
        }
        with self.open_metadata() as meta:
            info.files[META_FILE]["rows"] = meta.count()

    def check_integrity(self) -> IndexInfo:
        """index.json, after checking every file against its record (or, in an index.json from before records,
        against the files' own headers): a damaged file is one UserError naming it, before FAISS or numpy map
        it (a map past the end of a truncated file is a SIGBUS at the first query). The inverted lists are
        checked when `open_index` reads them."""
        info = self.load_info()
        self.check_complete(info)
        for name, want in sorted(info.files.items()):
            check_recorded(self.root / name, want)
        check_npy(self.vectors_path, int(info.n_rows), int(info.dim))
        check_sqlite(self.meta_path)
        return info

    # --- opening the files ---
    def open_index(self, *, writable: bool = False) -> faiss.Index:
        """Read-only: memory-mapped where the index type allows it (RAM holds only the pages queries touch),
        else read whole; on-disk lists are always memory-mapped, found beside index.faiss wherever the directory
        moved. Writable (to add to it): read whole, on-disk lists copied into memory."""
        import faiss

        if self.has_ondisk_lists():
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (0 if writable else faiss.IO_FLAG_READ_ONLY)
            index = self._read_index(flags)
            return _lists_into_memory(index) if writable else index
        if not writable:
            try:
                return self._read_index(faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except DamagedIndex:
                pass  # a type FAISS cannot memory-map: read it whole
        return self._read_index(0)

    def _read_index(self, flags: int) -> faiss.Index:
        """faiss.read_index, its errors (a truncated or foreign file) one line naming the file, and memory-mapped
        lists checked to end inside their file before anything reads them."""
        import faiss

        try:
            index = faiss.read_index(str(self.index_path), flags)
        except RuntimeError as exc:
            raise DamagedIndex(self.index_path, f"is unreadable ({_last_line(exc)})") from None
        check_mapped_lists(index, self.index_path)
        return index

    def write_index(self, index: faiss.Index) -> int:
        """Save the index; returns its size in bytes, on-disk lists included (index.json records it)."""
        _write_faiss(index, self.index_path)
        shutil.rmtree(self.root / PARTS_DIR, ignore_errors=True)
        return self.index_path.stat().st_size + (self.ivfdata_path.stat().st_size if self.has_ondisk_lists() else 0)

    def write_part(self, index: faiss.Index, rank: int) -> Path:
        """One rank's index (its own adds) for the merge; written under a temporary name, then renamed."""
        path = self.part_path(rank)
        path.parent.mkdir(exist_ok=True)
        tmp = temp_path(path)
        _write_faiss(index, tmp)
        os.replace(tmp, path)
        return path

    def open_vectors(self) -> np.ndarray:
        """vectors.npy as a read-only memory map."""
        try:
            return np.load(self.vectors_path, mmap_mode="r")
        except (ValueError, EOFError) as exc:
            raise DamagedIndex(self.vectors_path, f"is unreadable ({exc})") from None

    def create_vectors(self, n_rows: int, dim: int) -> np.ndarray:
        """A new float16 vectors.npy of `n_rows` zero rows, memory-mapped for writing. Its blocks are allocated
        first: a write through a map into a full disk is a SIGBUS, `posix_fallocate` an OSError (ENOSPC)."""
        allocate_npy(self.vectors_path, (n_rows, dim), np.float16)
        return np.lib.format.open_memmap(self.vectors_path, mode="r+")

    def open_metadata(self, *, readonly: bool = True) -> MetadataStore:
        return MetadataStore(self.meta_path, readonly=readonly)

    def copy_metadata_from(self, other: IndexDir) -> None:
        shutil.copy2(other.meta_path, self.meta_path)

    # --- building a new one (formats/index_swap.py) ---
    @classmethod
    @contextmanager
    def build_beside(cls, out: str | os.PathLike[str]) -> Iterator[IndexDir]:
        """A fresh temporary directory beside `out`, removed if the build fails; call `swap_in(out)` to finish.
        Leftovers of killed builds (kill -9, a node crash) are cleaned up first (`recover_interrupted`)."""
        tmp = new_build_dir(Path(out))
        try:
            yield cls(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def swap_in(self, out: str | os.PathLike[str]) -> IndexDir:
        """Put this finished directory in place of `out` (`index_swap.put_in_place`)."""
        put_in_place(self.root, Path(out))
        return IndexDir(out)
