"""`kdcache pack`: an image-folder tree (FOLDER/CLASS/.../IMAGE, as torchvision's ImageFolder, CIFAR-10 or ImageNet
folders hold it) into WebDataset shards as img2dataset writes them, plus the class-index file that
`kdcache build --classes` and `kdcache eval --classes` take.

    kdcache pack data/cifar10/train --out shards/cifar10-train-%05d.tar --captions-from-class "a photo of a {}."

Per image one sample: the file's bytes unchanged under its own extension (`.jpeg` written as `.jpg`), `.cls` (the
class index as ASCII) and, with a template, `.txt`. Classes are the sorted sub-folder names and images are walked in
ImageFolder's order, so sample i is ImageFolder's index i over the same files and packing twice writes the same bytes.
The key is the relative path, percent-encoded (`urllib.parse.unquote(key)` gives it back), so it has no "." or "/"
for webdataset's key/extension split to cut. `pack.json` is written last: a directory without it is unfinished.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from braceexpand import braceexpand
from tqdm import tqdm

from kdcache import __version__
from kdcache.shards.decode import IMAGE_EXTS
from kdcache.shards.tar import describe_error
from kdcache.vocab import check_template

SHARD_SIZE = 10_000  # images per shard, img2dataset's default
CLASSES_FILE = "classes.txt"
MANIFEST_FILE = "pack.json"
_MTIME = 0  # every tar member's mtime: the same files give the same bytes whenever they are packed
# Extension written for each readable one (lower-cased first): img2dataset writes JPEGs as ".jpg".
_WRITE_EXT = {e: "jpg" if e == "jpeg" else e for e in IMAGE_EXTS}
_SHOWN = 10  # skipped paths listed per reason in the summary (all of them are in pack.json)


class PackError(ValueError):
    """Packing cannot start; the message says what to change."""


@dataclass(frozen=True)
class Skipped:
    """A file or folder under FOLDER that was not packed, and why (a snake_case reason, as build's rejects)."""

    path: str  # relative to FOLDER; folders end with "/"
    reason: str  # hidden, not_an_image, empty_file, unreadable
    detail: str = ""


@dataclass(frozen=True)
class PackResult:
    """What `pack` wrote: shard paths (as --out spells them) with their sample counts, the classes, what it skipped."""

    out_dir: str
    shards: tuple[str, ...]
    shard_counts: tuple[int, ...]
    classes: tuple[str, ...]  # index = position = line number (0-based) in the class file
    class_counts: tuple[int, ...]
    classes_file: str
    manifest: str
    skipped: tuple[Skipped, ...]

    @property
    def images(self) -> int:
        return sum(self.shard_counts)

    @property
    def empty_classes(self) -> tuple[str, ...]:
        return tuple(c for c, n in zip(self.classes, self.class_counts, strict=True) if n == 0)

    @property
    def images_pattern(self) -> str:
        """The shards as one brace pattern for `kdcache build --images` (the only path when there is one shard)."""
        if len(self.shards) == 1:
            return self.shards[0]
        first, last = self.shards[0], self.shards[-1]
        # Digits shared by every name go inside the braces: 'out/{00000..00012}.tar', not 'out/000{00..12}.tar'.
        pre = os.path.commonprefix(list(self.shards)).rstrip("0123456789")
        suf = os.path.commonprefix([s[len(pre):][::-1] for s in self.shards])[::-1]
        candidate = f"{pre}{{{first[len(pre):len(first) - len(suf)]}..{last[len(pre):len(last) - len(suf)]}}}{suf}"
        # braceexpand pads only when the ends are zero-padded alike; a pattern it would expand differently is not
        # offered (%5d, custom formats): then the shards are listed as first..last in the summary instead.
        return candidate if list(braceexpand(candidate)) == list(self.shards) else ""


@dataclass(frozen=True)
class _Item:
    path: Path
    rel: str  # relative to FOLDER, "/"-separated
    label: int
    ext: str  # as written into the tar


def sample_key(rel: str) -> str:
    """The sample key of an image at relative path `rel` ("cat/a.b.jpg" -> "cat%2Fa%2Eb%2Ejpg"): percent-encoded,
    so unique, stable and reversible, with no "/" (keys name files, e.g. `kdcache show`'s PNG) and no "." (webdataset
    splits key from extension at the first dot of the basename)."""
    return quote(rel, safe="").replace(".", "%2E")


def _image_ext(name: str) -> str | None:
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    return _WRITE_EXT.get(ext)


def _shard_names(out: str) -> tuple[str, str]:
    """(directory, file-name format) of --out; the integer format must be in the file name."""
    out_dir, name = os.path.split(out)
    fmt = "the file name needs one integer format such as %05d, e.g. 'shards/%05d.tar'"
    try:
        a, b = name % 0, name % 1
    except (TypeError, ValueError, KeyError) as e:
        raise PackError(f"--out {out!r}: {fmt} ({describe_error(e)})") from None
    if a == b:
        raise PackError(f"--out {out!r}: {fmt}; this one names every shard {a!r}")
    if not a.endswith(".tar"):
        # Images are compressed already, and a gzip header carries a timestamp (packing twice would differ).
        raise PackError(f"--out {out!r}: shards are plain .tar files; end the pattern with .tar")
    return out_dir or ".", name


def _check_template(t: str) -> None:
    try:
        check_template(t, "--captions-from-class")  # the rule kdcache's --templates follow
    except ValueError as e:
        raise PackError(f"{e}, e.g. 'a photo of a {{}}.'") from None


def _check_out_dir(out_dir: Path, folder: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PackError(f"--out directory {out_dir} is a file")
        entries = sorted(p.name for p in out_dir.iterdir())
        if entries:
            raise PackError(f"--out directory {out_dir} is not empty ({len(entries)} entries: "
                            f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); pack writes a fresh set "
                            "of shards: remove it or choose another directory")
    if out_dir.resolve().is_relative_to(folder.resolve()):
        raise PackError(f"--out directory {out_dir} is inside FOLDER {folder}; it would be read as a class next time")


def _walk_class(folder: Path, name: str, label: int, items: list[_Item], skipped: list[Skipped]) -> None:
    """One class folder, recursively, in ImageFolder's order: sorted(os.walk(...)), then sorted file names."""
    walked = []
    for root, dirs, files in os.walk(folder / name, followlinks=True):
        rel_root = Path(root).relative_to(folder).as_posix()
        for d in sorted(d for d in dirs if d.startswith(".")):
            skipped.append(Skipped(f"{rel_root}/{d}/", "hidden"))
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .ipynb_checkpoints, .git: not part of the class
        walked.append((root, rel_root, files))
    for root, rel_root, files in sorted(walked):
        for f in sorted(files):
            rel, path = f"{rel_root}/{f}", Path(root) / f
            ext = _image_ext(f)
            if f.startswith("."):  # .DS_Store, macOS "._x.jpg" resource forks (not images despite the name)
                skipped.append(Skipped(rel, "hidden"))
            elif ext is None:
                skipped.append(Skipped(rel, "not_an_image", f"extension not one of {', '.join(IMAGE_EXTS)}"))
            elif not path.is_file():
                skipped.append(Skipped(rel, "unreadable", "not a regular file (broken link?)"))
            elif path.stat().st_size == 0:
                skipped.append(Skipped(rel, "empty_file", "0 bytes"))
            else:
                items.append(_Item(path, rel, label, ext))


def _scan(folder: Path) -> tuple[list[str], list[_Item], list[Skipped]]:
    """Classes (sorted sub-folder names), images in pack order, and what was skipped."""
    classes: list[str] = []
    items: list[_Item] = []
    skipped: list[Skipped] = []
    loose: list[str] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            skipped.append(Skipped(entry.name + ("/" if entry.is_dir() else ""), "hidden"))
        elif entry.is_dir():
            classes.append(entry.name)
        elif _image_ext(entry.name) is not None:
            loose.append(entry.name)
        else:
            skipped.append(Skipped(entry.name, "not_an_image", "a file outside the class folders"))
    if loose:
        raise PackError(f"{len(loose)} image(s) directly in {folder} ({', '.join(loose[:5])}"
                        f"{', ...' if len(loose) > 5 else ''}): pack wants FOLDER/CLASS/IMAGE, the class being the "
                        "folder name. Move them into a class folder, or point pack at the folder above.")
    bad = [c for c in classes if c != c.strip() or "\n" in c or "\r" in c]
    if bad:
        raise PackError(f"class folder names {bad[:5]!r} cannot be written one per line in {CLASSES_FILE} "
                        "(leading/trailing whitespace or line breaks): rename them")
    for label, name in enumerate(classes):
        _walk_class(folder, name, label, items, skipped)
    return classes, items, skipped


class _Files:
    """ShardWriter's opener and post hook: plain local files (never webdataset's URL schemes such as pipe:), each
    closed as soon as its shard is (TarWriter does not close a file it did not open)."""

    def __init__(self) -> None:
        self.open_files: dict[str, BinaryIO] = {}

    def open(self, fname: str) -> BinaryIO:
        f = self.open_files[fname] = open(fname, "wb")  # closed by close(), the post hook
        return f

    def close(self, fname: str) -> None:
        self.open_files.pop(fname).close()


def pack(folder: str | os.PathLike, *, out: str, shard_size: int = SHARD_SIZE, captions_from_class: str | None = None,
         progress: bool = True) -> PackResult:
    """Pack FOLDER/CLASS/.../IMAGE into shards named by `out` (a %-pattern such as 'shards/%05d.tar', in a new or
    empty directory), `shard_size` images each, with the class file and pack.json next to them.

    Images directly in FOLDER are an error (a labelled tree is expected; usually FOLDER is one level too deep).
    Non-image files, hidden files and folders, and empty files are skipped and listed; empty class folders keep
    their index (ImageFolder's numbering) and are listed. Raises PackError when nothing can or should be written.
    """
    import webdataset as wds  # imports torch: only when packing

    folder = Path(folder)
    if not folder.is_dir():
        raise PackError(f"FOLDER {folder} is not a directory")
    if shard_size < 1:
        raise PackError(f"--shard-size must be at least 1, not {shard_size}")
    out_dir_s, name = _shard_names(out)
    if captions_from_class is not None:
        _check_template(captions_from_class)
    out_dir = Path(out_dir_s)
    _check_out_dir(out_dir, folder)
    classes, items, skipped = _scan(folder)
    if not items:
        why = ", ".join(f"{k} {v}" for k, v in Counter(s.reason for s in skipped).items())
        raise PackError(f"no images to pack in {folder}: want FOLDER/CLASS/IMAGE.{{{','.join(IMAGE_EXTS)}}}; found "
                        f"{len(classes)} class folder(s)" + (f", skipped {why}" if why else ""))

    out_dir.mkdir(parents=True, exist_ok=True)
    files = _Files()
    per_shard: Counter[str] = Counter()
    per_class = [0] * len(classes)
    pattern = os.path.join(str(out_dir.resolve()).replace("%", "%%"), name)  # the directory is literal
    # PAX: member names over USTAR's 100 bytes (deep paths). webdataset 1.0.2 ignores `format` and tarfile's default
    # is PAX anyway; it is spelt out so the shards stay readable if webdataset starts honouring it.
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, opener=files.open, post=files.close,
                         encoder=False, mtime=_MTIME, format="PAX_FORMAT") as sink:
        for it in tqdm(items, desc="pack", unit="img", disable=not progress):
            try:
                data = it.path.read_bytes()
            except OSError as e:
                skipped.append(Skipped(it.rel, "unreadable", describe_error(e)))
                continue
            sample = {"__key__": sample_key(it.rel), it.ext: data, "cls": str(it.label).encode("ascii")}
            if captions_from_class is not None:
                sample["txt"] = captions_from_class.format(classes[it.label]).encode("utf-8")
            sink.write(sample)
            per_shard[os.path.basename(sink.fname)] += 1
            per_class[it.label] += 1

    if not per_shard:  # every image failed to read (ShardWriter has opened an empty first shard)
        raise PackError(f"none of the {len(items)} images in {folder} could be read, e.g. {skipped[-1].path}: "
                        f"{skipped[-1].detail}; {out_dir} holds no finished pack")
    shard_names = list(per_shard)  # in writing order: name % 0, name % 1, ...
    (out_dir / CLASSES_FILE).write_text("".join(c + "\n" for c in classes), encoding="utf-8")
    manifest = {
        "kdcache": __version__, "source": str(folder.resolve()), "shard_pattern": name, "shard_size": shard_size,
        "captions_from_class": captions_from_class, "images": sum(per_class), "classes_file": CLASSES_FILE,
        "key": "urllib.parse.quote(path relative to source, safe='') with '.' as %2E",
        "shards": [{"name": n, "samples": per_shard[n]} for n in shard_names],
        "classes": [{"index": i, "name": c, "images": per_class[i]} for i, c in enumerate(classes)],
        "skipped": [{"path": s.path, "reason": s.reason, "detail": s.detail} for s in skipped],
    }
    # Written last: "is this directory a finished pack?" has one answer.
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return PackResult(
        out_dir=str(out_dir), shards=tuple(os.path.join(out_dir_s, n) for n in shard_names),
        shard_counts=tuple(per_shard[n] for n in shard_names), classes=tuple(classes),
        class_counts=tuple(per_class), classes_file=str(out_dir / CLASSES_FILE),
        manifest=str(out_dir / MANIFEST_FILE), skipped=tuple(skipped))


def format_summary(r: PackResult) -> str:
    """What pack did, for a person: counts, skipped files by reason (with examples), the build command to run next."""
    images = r.images_pattern
    lines = [f"packed {r.images} images of {len(r.classes)} classes into {len(r.shards)} shard(s): "
             + (images or f"{r.shards[0]} .. {r.shards[-1]}"),
             f"  classes: {r.classes_file} (index = line number from 0)   manifest: {r.manifest}"]
    if r.empty_classes:
        lines.append(f"  classes without images (kept, so indices follow the folders): {', '.join(r.empty_classes)}")
    by_reason = Counter(s.reason for s in r.skipped)
    lines.append(f"  skipped: {len(r.skipped)}" + (" (" + ", ".join(f"{k} {v}" for k, v in by_reason.items()) + ")"
                                                   if r.skipped else ""))
    for reason in by_reason:
        paths = [s.path for s in r.skipped if s.reason == reason]
        more = f" ... and {len(paths) - _SHOWN} more (see {MANIFEST_FILE})" if len(paths) > _SHOWN else ""
        lines.append(f"    {reason}: {', '.join(paths[:_SHOWN])}{more}")
    if images:
        lines.append(f"  next: kdcache build --images '{images}' --classes {r.classes_file} --teacher ... --out ...")
    return "\n".join(lines)
