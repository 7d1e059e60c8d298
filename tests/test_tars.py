"""Tar listing without embedding (sub-second): member order, offsets that read back exactly, bad members and cut
tars as input lines with their reason, brace patterns, loose files and tars side by side."""

import io
import os
import tarfile

from clip_hpc.devdata.sample_images import captioned_samples, write_sample_tars, write_tar
from clip_hpc.formats.tar_member import file_on_disk, split_member_line
from clip_hpc.ingest.sources import list_inputs
from clip_hpc.ingest.tars import expand_braces, header_describes, index_tar, read_member


def test_expand_braces_like_the_shell():
    assert expand_braces("d/{00008..00011}.tar") == ["d/00008.tar", "d/00009.tar", "d/00010.tar", "d/00011.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_index_keeps_tar_order_and_offsets_read_back_exactly(tmp_path):
    samples = captioned_samples(6)
    samples.reverse()  # not sorted: the tar's order must win
    tar = write_tar(tmp_path / "x.tar", samples)
    listed = index_tar(tar)
    assert [s.name for s in listed] == [f"{key}.jpg" for key, _ in samples]
    with tarfile.open(tar) as tf:
        for sample in listed:
            assert read_member(tar, sample.image) == tf.extractfile(sample.name).read()
            assert read_member(tar, sample.caption) == tf.extractfile(sample.name[:-3] + "txt").read()
    assert split_member_line(listed[0].line) == (str(tar), listed[0].name)


def test_member_lines_split_after_the_tar_that_exists(tmp_path):
    """The `::` after an existing `.tar` ends the tar path: not a `::` in a directory name (even `x.tar::y/`), and a
    member's own `::` stays in the member; a loose file or a line without a tar is no member."""
    (tmp_path / "d::x.tar::y").mkdir()
    tar = tmp_path / "d::x.tar::y" / "a.tar"
    tar.write_bytes(b"")
    assert split_member_line(f"{tar}::k::v.jpg") == (str(tar), "k::v.jpg")
    assert split_member_line(f"{tar}::sub.tar::v.jpg") == (str(tar), "sub.tar::v.jpg")
    loose = tmp_path / "d::x.tar::y" / "b.jpg"
    loose.write_bytes(b"")
    assert split_member_line(str(loose)) is None and file_on_disk(str(loose)) == str(loose)
    assert split_member_line(f"{tmp_path}/d::x/c.jpg") is None
    gone = f"{tmp_path}/e.tar::f/g.tar::h.jpg"  # neither tar exists: the deeper guess, never a wider directory
    assert split_member_line(gone) == (f"{tmp_path}/e.tar::f/g.tar", "h.jpg")


def test_sidecars_without_image_and_cut_tars_become_failing_lines(tmp_path):
    good = captioned_samples(3)
    tar = write_tar(
        tmp_path / "a.tar", [good[0], ("lonely", {"txt": b"no picture"}), good[1], ("other", {"cls": b"3"})]
    )
    problems = [s.problem.split(":")[0] for s in index_tar(tar)]
    assert problems == ["", "no image", ""]  # a member of no known kind is no input at all
    whole = write_tar(tmp_path / "b.tar", good).read_bytes()
    in_data = tmp_path / "cut-in-data.tar"
    in_data.write_bytes(whole[: whole.rindex(good[2][1]["jpg"][:64]) + 100])
    assert [s.problem.split(":")[0] for s in index_tar(in_data)] == ["", "", "truncated tar"]
    header_at = whole.index(b"000000002.jpg")
    in_header = tmp_path / "cut-in-header.tar"
    in_header.write_bytes(whole[: header_at + 300])  # the third sample's header is cut half-way
    listed = index_tar(in_header)
    assert [s.problem.split(":")[0] for s in listed] == ["", "", "truncated tar"]
    assert listed[-1].name.startswith("<unreadable after byte")


def test_list_inputs_mixes_loose_files_and_tars_and_expands_patterns(tmp_path):
    tars = write_sample_tars(tmp_path / "shards", 3, 2)
    loose = tmp_path / "shards" / "z.jpg"
    loose.write_bytes(captioned_samples(1)[0][1]["jpg"])
    listing = list_inputs([str(tmp_path / "shards" / "{00000..00001}.tar"), loose])
    assert listing.lines == [f"{tars[t]}::{i:09d}.jpg" for t in (0, 1) for i in (2 * t, 2 * t + 1)] + [str(loose)]
    assert set(listing.tar_samples) == set(listing.lines[:4])
    assert len(list_inputs([tmp_path / "shards"]).lines) == 7  # a directory: its tars and its loose images
    not_a_tar = tmp_path / "junk.tar"
    not_a_tar.write_bytes(b"x" * 1000)
    listed = list_inputs([not_a_tar])  # an empty or failed download: one failing line, the run goes on
    assert [s.problem.split(":")[0] for s in listed.tar_samples.values()] == ["not a tar"]
    not_a_tar.chmod(0)
    if not os.access(not_a_tar, os.R_OK):  # root reads anything
        (sample,) = list_inputs([not_a_tar]).tar_samples.values()
        assert sample.problem.startswith("read error")


def test_a_missing_tar_is_a_failing_line_and_the_others_embed(tmp_path):
    """One failed download among a list of tars stopped the whole job at listing ('cannot read tar'), where a
    missing image or object is a recorded `missing file`."""
    tars = write_sample_tars(tmp_path / "shards", 2, 2)
    gone = tmp_path / "shards" / "gone.tar"
    file_list = tmp_path / "list.txt"
    file_list.write_text("\n".join(map(str, [tars[0], gone, tars[1]])) + "\n")
    listing = list_inputs([], str(file_list))
    problems = {line: s.problem for line, s in listing.tar_samples.items() if s.problem}
    assert list(problems.values()) == ["missing file"] and next(iter(problems)).startswith(str(gone))
    assert sum(not s.problem for s in listing.tar_samples.values()) == 4


def test_a_tar_that_is_no_regular_file_is_a_failing_line_not_a_hang(tmp_path):
    """A FIFO named `.tar` blocked `open()` forever while the inputs were listed: the whole job hung."""
    os.mkfifo(tmp_path / "pipe.tar")
    (sample,) = index_tar(tmp_path / "pipe.tar")
    assert sample.image is None and sample.problem.startswith("not a tar: not a regular file")


def test_member_names_with_several_dots_are_images_not_dropped(tmp_path):
    """`photo.2019.jpg` has the WebDataset key `photo` and the extension `2019.jpg`, which is no image suffix: the
    image was neither embedded nor recorded. Such a member is keyed by its name less the last suffix, and shares
    sidecars of that key only (`photo.2019.txt`), never another sample's."""
    samples = [
        ("photo.2019", {"jpg": b"A", "txt": b"own caption"}),
        ("photo", {"jpg": b"B", "txt": b"other"}),
        ("seg.mask", {"png": b"C"}),
        ("lone.v2", {"txt": b"orphan field"}),
    ]
    tar = tmp_path / "dots.tar"
    with tarfile.open(tar, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    listed = {s.name: s for s in index_tar(tar)}
    assert sorted(listed) == ["photo.2019.jpg", "photo.jpg", "seg.mask.png"]  # an orphan field is no input line
    assert read_member(tar, listed["photo.2019.jpg"].caption) == b"own caption"
    assert read_member(tar, listed["photo.jpg"].caption) == b"other"
    assert listed["seg.mask.png"].caption is None and not listed["seg.mask.png"].problem


def test_an_orphan_field_is_judged_by_its_own_key_not_the_last_one_listed(tmp_path):
    """Whether sidecars without an image are a lost image was decided by the last key in the tar, not their own:
    a WebDataset field (`lone.v2.txt`) before an ordinary sample became a failing 'no image' line."""
    tar = tmp_path / "order.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (("lone.v2.txt", b"orphan field"), ("photo.jpg", b"B"), ("gone.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    problems = {s.name: s.problem.split(":")[0] for s in index_tar(tar)}
    assert problems == {"photo.jpg": "", "gone.txt": "no image"}


def test_long_member_names_pass_the_header_check_however_the_writer_spelled_them():
    """GNU tar's oldgnu format keeps 99 bytes of a long name, libarchive an abbreviation: the check demanded
    Python's 100-byte prefix, so such members failed as 'the tar changed after indexing' (embed and server)."""
    long = "d" * 120 + "/k.jpg"
    info = tarfile.TarInfo(long)
    info.size = 3
    plain = bytearray(info.tobuf(tarfile.GNU_FORMAT)[-tarfile.BLOCKSIZE :])  # the header before the data

    def spelled_as(stored: bytes) -> bytes:
        block = bytearray(plain)
        block[:100] = stored.ljust(100, b"\0")
        block[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(block[:148]) + b" " * 8 + bytes(block[156:]))[0]
        return bytes(block)

    for stored in (long[:99].encode(), b"dddd/.../k.jpg", long[:100].encode()):
        assert header_describes(spelled_as(stored), long, 3), stored
    assert not header_describes(spelled_as(b"other.jpg"), long, 4)  # the size still decides
    short = spelled_as(b"k.jpg")
    assert header_describes(short, "k.jpg", 3) and not header_describes(short, "j.jpg", 3)


def test_a_file_named_tar_that_is_no_tar_is_a_failing_line_not_a_crash(tmp_path):
    """A failed download named `.tar` (plain text, not gzip) raised UnboundLocalError while the inputs were listed:
    the 'not a tar' line read an exception variable only the `.gz` branch had set."""
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all, only some bytes " * 40)
    (sample,) = index_tar(tmp_path / "junk.tar")
    assert sample.image is None and sample.problem.startswith("not a tar: ")


def test_a_compressed_tar_in_a_directory_is_a_failing_line_not_skipped(tmp_path):
    """`.tar.gz`/`.tgz` shards in an input directory were skipped without a word: their images were lost with no
    failure recorded. Members cannot be read by offset from a gzip stream, so each is one failing line saying so."""
    import gzip

    write_tar(tmp_path / "plain.tar", captioned_samples(1))
    for name in ("a.tar.gz", "b.TGZ"):
        (tmp_path / name).write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    listing = list_inputs([tmp_path])
    bad = {line: sample.problem for line, sample in listing.tar_samples.items() if sample.problem}
    assert len(listing.lines) == 3 and len(bad) == 2
    assert all("decompress" in problem for problem in bad.values()), bad
