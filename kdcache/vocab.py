"""Class vocabularies and prompt templates for the teacher's zero-shot head (`--classes`, `--templates`).

Built-in class lists: `imagenet` comes from open_clip's zero-shot metadata; open_clip 3.3 ships no CIFAR names, so
`cifar10` and `cifar100` are text files in `kdcache/data/`, in torchvision's label order (the index is the `.cls`
label). CIFAR-100 names are written as natural words ("aquarium fish", "maple tree") as CLIP's own prompt notes and
CLIP_benchmark do, not torchvision's identifiers ("aquarium_fish"), because they are fed to a text encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

BUILTIN_CLASSES = ("cifar10", "cifar100", "imagenet")
BUILTIN_TEMPLATES = ("openai", "simple", "photo")
DEFAULT_TEMPLATES = "simple"


def _lines(text: str) -> list[str]:
    # Blank lines are skipped; surrounding whitespace is not part of a name or a template.
    return [line.strip() for line in text.splitlines() if line.strip()]


def _file_lines(path: Path, option: str) -> list[str]:
    """The non-blank lines of a `--classes`/`--templates` file (a UTF-8 byte-order mark is accepted), or ValueError
    naming the file: not UTF-8, unreadable, or holding a NUL (the cache could not store that name faithfully)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes().count(b"\n", 0, e.start) + 1
        raise ValueError(f"{option} file {path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                         "UTF-8") from None
    except OSError as e:
        raise ValueError(f"{option} file {path}: cannot be read ({e.strerror or e})") from None
    lines = _lines(text)
    bad = next((i for i, line in enumerate(lines) if "\0" in line), None)
    if bad is not None:
        raise ValueError(f"{option} file {path}: entry {bad + 1} holds a NUL character")
    return lines


def load_classes(spec: str) -> tuple[list[str], str]:
    """Class names for `--classes`: a built-in vocabulary or a text file (one class per line); returns (names,
    a description of where they came from)."""
    if spec == "imagenet":
        return list(IMAGENET_CLASSNAMES), "built-in imagenet (open_clip zero_shot_metadata.IMAGENET_CLASSNAMES)"
    if spec in ("cifar10", "cifar100"):
        res = resources.files("kdcache") / "data" / f"{spec}.txt"
        names = _lines(res.read_text(encoding="utf-8"))
        return names, f"built-in {spec} (kdcache/data/{spec}.txt, torchvision label order)"
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--classes {spec!r} is neither a built-in vocabulary ({', '.join(BUILTIN_CLASSES)}) "
                         "nor an existing text file with one class per line")
    names = _file_lines(path, "--classes")
    if not names:
        raise ValueError(f"--classes file {spec} holds no class names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        # Two rows of the head would be identical and the label index ambiguous.
        raise ValueError(f"--classes file {spec} repeats class names: {dup[:5]}")
    return names, f"file {path.resolve()}"


def _as_format_string(template: Callable[[str], str] | str) -> str:
    """open_clip's templates are lambdas (`lambda c: f'a photo of a {c}.'`); calling one with "{}" gives the
    equivalent format string, which is what a cache can store."""
    return template if isinstance(template, str) else template("{}")


def check_template(t: str, where: str) -> str:
    """`t` as a format string with exactly one positional {} (`{c}` accepted), or ValueError naming `where`."""
    t = t.replace("{c}", "{}")
    try:
        # Exactly one positional "{}" and no other replacement fields; otherwise format() fails or drops the class.
        ok = t.count("{}") == 1 and t.format("\0") == t.replace("{}", "\0")
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"template {t!r} ({where}) must contain the class placeholder {{}} (or {{c}}) exactly once "
                         "and no other braces")
    return t


def load_templates(spec: str | None, *, classes_spec: str | None = None) -> tuple[list[str], str]:
    """Prompt templates for `--templates` as plain format strings with one "{}": a built-in set ("openai", "simple",
    "photo") or a text file, one template per line ("{c}" is accepted for "{}"). None means "simple".

    `classes_spec` only enters the description (the default is the same for every vocabulary)."""
    chosen: Sequence[Callable[[str], str] | str]
    if spec is None:
        spec_used, how = DEFAULT_TEMPLATES, "default "
    else:
        spec_used, how = spec, ""
    if spec_used == "openai":
        chosen, src = OPENAI_IMAGENET_TEMPLATES, "open_clip OPENAI_IMAGENET_TEMPLATES"
    elif spec_used == "simple":
        chosen, src = SIMPLE_IMAGENET_TEMPLATES, "open_clip SIMPLE_IMAGENET_TEMPLATES"
    elif spec_used == "photo":
        chosen, src = ("a photo of a {}.",), "a photo of a {}."
    else:
        path = Path(spec_used)
        if not path.is_file():
            raise ValueError(f"--templates {spec_used!r} is neither a built-in template set "
                             f"({', '.join(BUILTIN_TEMPLATES)}) nor an existing text file with one template per line")
        chosen = _file_lines(path, "--templates")
        if not chosen:
            raise ValueError(f"--templates file {spec_used} holds no templates")
        return [check_template(t, f"{path}, template {i + 1}") for i, t in enumerate(chosen)], f"file {path.resolve()}"
    templates = [check_template(_as_format_string(t), spec_used) for t in chosen]
    desc = f"{how}built-in {spec_used} ({src})"
    if spec is None and classes_spec is not None:
        desc += f" for classes {classes_spec}"
    return templates, desc
