"""kdcache pack: an image-folder tree becomes shards that `kdcache build` caches with the right labels, holding the
original image bytes, in a deterministic order; what is not packed is reported; bad requests are clear errors."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner
from conftest import build_cache
from PIL import Image

from kdcache.cache.reader import open_cache
from kdcache.cli.main import cli
from kdcache.shards import ShardReport, iter_shard, parse_sample
from kdcache.shards.pack import SHARD_SIZE, PackError, format_summary, pack, sample_key
from kdcache.synth import class_colour

CLASSES = ["blue", "green", "red"]  # sorted folder names = class indices 0, 1, 2
LONG = "a-very-long-file-name-" + "x" * 110 + ".png"  # a tar member name over USTAR's 100 bytes
# Relative path -> format. Dots in a name, upper-case .JPEG, .jpeg, a sub-folder, a non-ASCII and a long name.
IMAGES = {
    "blue/b1.jpg": "JPEG", f"blue/{LONG}": "PNG", "blue/deep/b2.png": "PNG",
    "green/g1.png": "PNG", "green/grün.jpeg": "JPEG",
    "red/a.b.jpg": "JPEG", "red/UPPER.JPEG": "JPEG", "red/r3.jpg": "JPEG",
}
# Relative path -> the reason it is skipped.
OTHERS = {"LICENSE": "not_an_image", ".DS_Store": "hidden", "red/notes.txt": "not_an_image",
          "blue/pic.bmp": "not_an_image", "green/empty.jpg": "empty_file", "green/._g1.png": "hidden"}


def _picture(rel: str, fmt: str) -> bytes:
    cls = rel.split("/")[0]
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), class_colour(cls)).save(buf, format=fmt)
    return buf.getvalue()


def make_tree(root: Path, order: list[str] | None = None) -> Path:
    """The test tree; `order` is the order files are created in (directory listings may follow it)."""
    for rel in order or [*IMAGES, *OTHERS]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel in IMAGES:
            p.write_bytes(_picture(rel, IMAGES[rel]))
        elif OTHERS[rel] == "empty_file":
            p.write_bytes(b"")
        else:
            p.write_bytes(b"not a picture")
    return root


def _label(rel: str) -> int:
    return CLASSES.index(rel.split("/")[0])


def tar_samples(path: str) -> list[tuple[str, dict[str, bytes], tarfile.TarInfo]]:
    """A shard read with plain tarfile and webdataset's rule (key = up to the first dot of the basename)."""
    out: list[tuple[str, dict[str, bytes], tarfile.TarInfo]] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}, m))
            out[-1][1][ext] = tf.extractfile(m).read()
    return out


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "tree")


def test_shards_hold_the_original_bytes_labels_and_captions(tree, tmp_path):
    res = pack(tree, out=str(tmp_path / "out" / "%05d.tar"), captions_from_class="a photo of a {}.", progress=False)
    samples = [s for shard in res.shards for s in tar_samples(shard)]
    assert [unquote(k) for k, _, _ in samples] == sorted(IMAGES, key=lambda r: (_label(r), r))
    for key, members, info in samples:
        rel = unquote(key)
        ext = {"JPEG": "jpg", "PNG": "png"}[IMAGES[rel]]  # .JPEG and .jpeg are written as .jpg
        assert sorted(members) == sorted([ext, "cls", "txt"]), rel
        assert members[ext] == (tree / rel).read_bytes(), f"{rel}: bytes changed"
        assert members["cls"] == str(_label(rel)).encode("ascii")
        assert members["txt"].decode() == f"a photo of a {rel.split('/')[0]}."
        assert info.mtime == 0 and info.uname == "bigdata"
    assert Path(res.classes_file).read_text() == "blue\ngreen\nred\n"
    assert res.classes == tuple(CLASSES) and res.class_counts == (3, 2, 3) and res.images == len(IMAGES)


def test_keys_survive_the_readers_webdataset_split(tree, tmp_path):
    """kdcache's own reader (webdataset's base_plus_ext) sees one whole sample per image, dotted names included."""
    res = pack(tree, out=str(tmp_path / "out" / "s-%03d.tar"), shard_size=3, progress=False)
    keys = []
    for shard in res.shards:
        report = ShardReport(url=shard)
        for raw in iter_shard(shard, report):
            assert raw.problem is None
            s = parse_sample(raw, max_pixels=10**6)
            assert s.label == _label(unquote(raw.key)) and s.caption is None and s.image.size == (12, 10)
            keys.append(raw.key)
        assert not report.truncated, report.error
    assert sorted(unquote(k) for k in keys) == sorted(IMAGES)
    assert sample_key("red/a.b.jpg") == "red%2Fa%2Eb%2Ejpg" and "." not in "".join(keys) and "/" not in "".join(keys)


def test_order_is_imagefolders(tree, tmp_path):
    """Sample i is torchvision ImageFolder's sample i over the same files, with the same class index."""
    from torchvision.datasets import ImageFolder

    res = pack(tree, out=str(tmp_path / "out" / "%05d.tar"), progress=False)
    ours = [(unquote(k), int(m["cls"])) for shard in res.shards for k, m, _ in tar_samples(shard)]
    ds = ImageFolder(str(tree), is_valid_file=lambda p: Path(p).relative_to(tree).as_posix() in IMAGES)
    assert ds.classes == CLASSES
    assert ours == [(Path(p).relative_to(tree).as_posix(), y) for p, y in ds.samples]


def test_packing_twice_gives_identical_bytes(tmp_path):
    a = make_tree(tmp_path / "a")
    b = make_tree(tmp_path / "b", order=list(reversed([*IMAGES, *OTHERS])))  # other creation order
    for f in (b / "red").iterdir():
        os.utime(f, (1_000_000, 1_000_000))  # other file times
    ra = pack(a, out=str(tmp_path / "pa" / "%05d.tar"), shard_size=3, progress=False)
    rb = pack(b, out=str(tmp_path / "pb" / "%05d.tar"), shard_size=3, progress=False)
    ra2 = pack(a, out=str(tmp_path / "pa2" / "%05d.tar"), shard_size=3, progress=False)
    assert len(ra.shards) == len(rb.shards) == 3
    for x, y, z in zip(ra.shards, rb.shards, ra2.shards, strict=True):
        assert Path(x).read_bytes() == Path(y).read_bytes() == Path(z).read_bytes(), x
    assert Path(ra.classes_file).read_bytes() == Path(rb.classes_file).read_bytes()
    assert Path(ra.manifest).read_bytes() == Path(ra2.manifest).read_bytes()


@pytest.mark.parametrize("size, counts", [(3, (3, 3, 2)), (4, (4, 4)), (8, (8,)), (100, (8,))])
def test_shard_size_splits_as_asked(tree, tmp_path, size, counts):
    res = pack(tree, out=str(tmp_path / "out" / "part-%05d.tar"), shard_size=size, progress=False)
    assert res.shard_counts == counts
    assert res.shards == tuple(str(tmp_path / "out" / f"part-{i:05d}.tar") for i in range(len(counts)))
    assert tuple(len(tar_samples(s)) for s in res.shards) == counts
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [*(Path(s).name for s in res.shards), "classes.txt", "pack.json"])
    if len(counts) > 1:
        assert res.images_pattern == str(tmp_path / "out" / f"part-{{00000..{len(counts) - 1:05d}}}.tar")


def test_skipped_files_are_counted_and_listed(tree, tmp_path):
    (tree / "yellow").mkdir()  # a class folder with no images: kept (indices follow the folders), reported
    (tree / "yellow" / "readme.md").write_text("x")
    (tree / ".ipynb_checkpoints").mkdir()
    (tree / ".ipynb_checkpoints" / "x.jpg").write_bytes(_picture("red/x.jpg", "JPEG"))
    (tree / "red" / "gone.jpg").symlink_to(tree / "nowhere.jpg")
    res = pack(tree, out=str(tmp_path / "out" / "%05d.tar"), progress=False)
    expected = {**OTHERS, "yellow/readme.md": "not_an_image", ".ipynb_checkpoints/": "hidden",
                "red/gone.jpg": "unreadable"}
    assert {s.path: s.reason for s in res.skipped} == expected
    assert res.classes == (*CLASSES, "yellow") and res.empty_classes == ("yellow",)
    assert res.images == len(IMAGES)
    text = format_summary(res)
    assert "skipped: 9 (" in text and "empty_file 1" in text and "green/empty.jpg" in text and "yellow" in text


@pytest.mark.parametrize("case, message", [
    ("empty", "no images to pack"),
    ("only_junk", "no images to pack"),
    ("no_format", "integer format"),
    ("one_name", "names every shard"),
    ("gzip", "plain .tar"),
    ("not_empty", "is not empty"),
    ("loose_images", "directly in"),
    ("template", "placeholder {}"),
    ("inside", "inside FOLDER"),
])
def test_errors_are_clear_and_write_nothing(tmp_path, case, message):
    folder = tmp_path / "tree"
    folder.mkdir()
    out = tmp_path / "out"
    pattern, template = str(out / "%05d.tar"), None
    if case not in ("empty", "only_junk"):
        make_tree(folder)
    if case == "only_junk":
        (folder / "cat").mkdir()
        (folder / "cat" / "x.txt").write_text("x")
    pattern = {"no_format": str(out / "shard.tar"), "one_name": str(out / "%.0s.tar"),
               "gzip": str(out / "%05d.tar.gz"), "inside": str(folder / "shards" / "%05d.tar")}.get(case, pattern)
    if case == "not_empty":
        out.mkdir()
        (out / "00000.tar").write_bytes(b"old")
    if case == "loose_images":
        (folder / "stray.png").write_bytes(_picture("red/x", "PNG"))
    if case == "template":
        template = "a photo of a {name}."
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(PackError, match=message) as e:
        pack(folder, out=pattern, captions_from_class=template, progress=False)
    if case == "loose_images":
        assert "stray.png" in str(e.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_build_caches_every_packed_image_with_its_label(tree, tmp_path, teacher_spec):
    res = pack(tree, out=str(tmp_path / "shards" / "%05d.tar"), shard_size=3, captions_from_class="a photo of a {}.",
               progress=False)
    out = tmp_path / "cache.zarr"
    built = build_cache(out, teacher=teacher_spec, images=tuple(res.shards), classes=res.classes_file, batch_size=4)
    assert built.ok and built.summary["images"] == len(IMAGES) and not built.summary["rejected"]
    c = open_cache(str(out))
    assert c.vocab()[0] == CLASSES
    seen = {}
    for unit in c.units("images"):
        d = c.read(unit)
        for key, label, valid, caption in zip(d["key"], d["label"], d["valid"], d["caption"], strict=True):
            assert valid, key
            seen[unquote(str(key))] = (int(label), str(caption))
    assert seen == {rel: (_label(rel), f"a photo of a {rel.split('/')[0]}.") for rel in IMAGES}


def test_cli(tree, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["pack", str(tree), "--out", str(out / "%05d.tar"), "--shard-size", "5",
                                 "--captions-from-class", "a photo of a {}.", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"packed {len(IMAGES)} images of 3 classes into 2 shard(s)" in r.output
    assert "not_an_image 3" in r.output and "blue/pic.bmp" in r.output
    assert f"--images '{out}/{{00000..00001}}.tar' --classes {out}/classes.txt" in r.output
    assert (out / "00001.tar").is_file() and (out / "pack.json").is_file()
    again = CliRunner().invoke(cli, ["pack", str(tree), "--out", str(out / "%05d.tar"), "--no-progress"])
    assert again.exit_code == 1 and "is not empty" in again.output and "Traceback" not in again.output
    assert isinstance(again.exception, SystemExit)
    bad = CliRunner().invoke(cli, ["pack", str(tree), "--out", str(tmp_path / "o2" / "shard.tar")])
    assert bad.exit_code == 1 and "integer format" in bad.output


def test_cli_default_shard_size_is_the_functions():
    (param,) = [p for p in cli.commands["pack"].params if p.name == "shard_size"]
    assert param.default == SHARD_SIZE
