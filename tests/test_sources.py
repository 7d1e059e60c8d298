import os
from pathlib import Path

import pytest

from clip_hpc.errors import UserError
from clip_hpc.ingest.sources import list_images, plan_work_units, reconcile_inputs, units_for_rank


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_list_images_recursive_sorted_dedup_any_case(tmp_path):
    a = touch(tmp_path / "b" / "one.JPG")
    b = touch(tmp_path / "a" / "deep" / "two.png")
    c = touch(tmp_path / "three.TiFF")
    touch(tmp_path / "notes.txt")
    listed = list_images([tmp_path, a, tmp_path / "b"])
    assert listed == sorted(str(p.resolve()) for p in (a, b, c))


def test_file_list_joins_inputs(tmp_path):
    a = touch(tmp_path / "x.jpg")
    b = touch(tmp_path / "other" / "y.webp")
    fl = tmp_path / "list.txt"
    fl.write_text(f"# comment\n{b}\n\n{a}\n")
    assert list_images([], file_list=fl) == sorted([str(a), str(b)])


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_input_is_a_user_error(tmp_path, make):
    target = tmp_path / "nothing-here"
    if make == "empty":
        target.mkdir()
    with pytest.raises(UserError):
        list_images([target])


def test_reconcile_keeps_ids_stable_and_appends_at_the_end():
    saved = ["/a.jpg", "/c.jpg"]
    assert reconcile_inputs(saved, ["/c.jpg", "/a.jpg"], append=False) == saved
    with pytest.raises(UserError, match="--append"):
        reconcile_inputs(saved, ["/a.jpg", "/b.jpg", "/c.jpg"], append=False)
    assert reconcile_inputs(saved, ["/a.jpg", "/b.jpg", "/c.jpg"], append=True) == ["/a.jpg", "/c.jpg", "/b.jpg"]
    assert reconcile_inputs([], ["/z.jpg"], append=False) == ["/z.jpg"]


def test_work_units_cover_every_id_once_for_any_world_size():
    units = plan_work_units(103, 10)
    assert [u.index for u in units] == list(range(11))
    assert units[-1].start == 100 and units[-1].stop == 103
    for size in (1, 2, 3, 7):
        ids = sorted(i for r in range(size) for u in units_for_rank(units, r, size) for i in u.ids)
        assert ids == list(range(103))
    with pytest.raises(UserError):
        plan_work_units(10, 0)


def test_symlink_loops_and_linked_directories_list_each_directory_once(tmp_path):
    """A link to itself (ELOOP from DirEntry.is_dir) used to end the whole job at listing; two links to an ancestor
    made the walk exponential, and a link to a walked directory listed its images twice."""
    a = touch(tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "sub" / "up2").symlink_to("..")
    (tmp_path / "again").symlink_to("sub")
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    (tmp_path / "loop").symlink_to("loop")
    listed = list_images([tmp_path])
    assert listed == sorted([str(a), str(tmp_path / "loop.jpg")])  # the looping .jpg fails later, with a reason


def test_file_list_with_bom_crlf_and_undecodable_names(tmp_path):
    """A BOM (Notepad's UTF-8, or UTF-16) used to become part of the first path, and a name that is not UTF-8 was
    replaced by U+FFFD: both images were then 'missing files' although they exist."""
    a = touch(tmp_path / "x.jpg")
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(b"x")
    fl = tmp_path / "list.txt"
    fl.write_bytes(b"\xef\xbb\xbf" + os.fsencode(a) + b"\r\n" + raw + b"\r\n")
    assert list_images([], file_list=fl) == sorted([str(a), os.fsdecode(raw)])
    fl.write_text(f"{a}\n", encoding="utf-16")
    assert list_images([], file_list=fl) == [str(a)]
