"""Where the bytes of an indexed image are: a whole file, or a tar member at its stored offset and size.

The one place the server turns a meta.sqlite row into bytes (the image route, thumbnails and the ZIP export all ask
here), so a tar member is served by one seek and one read, never by scanning its tar.
"""

from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_hpc.formats.input_identity import check_content, check_stat
from clip_hpc.formats.tar_member import SEPARATOR, split_member_line
from clip_hpc.ingest.object_store import is_url
from clip_hpc.ingest.tars import Member, read_indexed_member


@dataclass(frozen=True)
class ImageSource:
    """An indexed image's bytes: the file `path`, or `member` (offset, size) inside the tar `path`; a `str` path is
    an object-store URL (a Path would fold its `//`)."""

    path: Path | str
    name: str
    member: Member | None = None
    member_name: str = ""  # the member's full name in its tar, checked against its header before every read
    identity: str = ""  # what was embedded (formats/input_identity.py): the bytes read are checked against it

    @property
    def media_type(self) -> str:
        return mimetypes.guess_type(self.name)[0] or "application/octet-stream"

    @property
    def indexed_path(self) -> str:
        """The path as meta.sqlite records it: `TAR::MEMBER` for a tar member."""
        return f"{self.path}{SEPARATOR}{self.member_name}" if self.member is not None else str(self.path)

    @property
    def remote(self) -> bool:
        return isinstance(self.path, str)

    def available(self, object_size: int | None = None) -> bool:
        """The file is there (for a member: the tar is, and is long enough to hold it); an object's `object_size` is
        what the server's HEAD found."""
        if self.remote:
            return object_size is not None and (
                self.member is None or object_size >= self.member.offset + self.member.size
            )
        path = Path(self.path)
        try:
            if self.member is None:
                return path.is_file()
            return path.stat().st_size >= self.member.offset + self.member.size
        except OSError:
            return False

    def read_bytes(self) -> bytes:
        """Exactly the image's bytes (OSError if they cannot be read, ChangedTarError if its tar was rewritten,
        ChangedInputError if they are not the bytes embedded; a local loose file is judged by its stat, `check`)."""
        if self.member is None:
            if isinstance(self.path, str):
                from clip_hpc.ingest.object_store import read_object

                return check_content(self.identity, read_object(self.path), self.path)
            return self.path.read_bytes()
        data = read_indexed_member(self.path, self.member, self.member_name)
        return check_content(self.identity, data, f"{self.path}::{self.member_name}")

    def check(self, st: os.stat_result | None) -> None:
        """ChangedInputError when a local loose file's stat (`st`, as judged servable) is not the embedded one's."""
        if st is not None and self.member is None and not self.remote:
            check_stat(self.identity, st, str(self.path))

    def decodable(self) -> str | Path | bytes:
        """What `images.decode_image` takes: the path of a file (decoded lazily), the bytes of a member or object."""
        return self.path if self.member is None and not self.remote else self.read_bytes()


def locate(record: dict[str, Any] | None) -> ImageSource | None:
    """A meta.sqlite row (`MetadataStore.full_record`) -> where its bytes are; None for an unknown id. Only a row
    with an offset is a tar member; which `::` ends its tar path is a file-system question (`split_member_line`)."""
    if record is None:
        return None
    path = str(record["path"])
    remote = is_url(path)
    offset, size = record.get("offset"), record.get("size")
    identity = str(record.get("identity") or "")
    is_file = _object_exists if remote else os.path.isfile
    tar_member = None if offset is None or size is None or offset < 0 else split_member_line(path, is_file)
    if tar_member is None or offset is None or size is None:
        return ImageSource(path if remote else Path(path), os.path.basename(path), identity=identity)
    tar, member = tar_member
    where = Member(int(offset), int(size))
    return ImageSource(tar if remote else Path(tar), os.path.basename(member), where, member, identity)


def _object_exists(url: str) -> bool:
    from clip_hpc.ingest.object_store import is_object

    return is_object(url)
