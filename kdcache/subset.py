"""Subsets of one cache or test set by `__key__`, shard name and label: `--include`, `--exclude`, `--labels`.

    s = Subset(include=("shard-0000[0-4].tar",), exclude=("re:_dup$",), labels=("cat", 3)).resolve(classes)
    s.keeps(key="000010002", shard="shard-00001.tar", label=2)     # -> bool
    s.mask(keys, shard="shard-00001.tar", labels=labels)           # -> bool array over rows

The rule, the same for `kdcache train` and `kdcache eval`:

- A pattern is a glob (`fnmatch` syntax, matched against the whole string, case-sensitive on every platform) or, with
  the prefix `re:`, a Python regular expression found anywhere in the string (`re.search`; anchor it with `^...$` to
  match the whole string).
- A pattern matches a row when it matches the row's `__key__` *or* its shard's file name (the last path component of
  the shard URL, e.g. `shard-00001.tar`; for a caption-corpus record the corpus file name, and its key is
  `cap:CORPUS:INDEX`, CORPUS being the --captions input's index and INDEX the record's).
- A row is kept when no `--include` is given or at least one matches, and no `--exclude` matches, and, with
  `--labels`, its label is one of them (a row without a label is then never kept).
- `--labels` takes class ids or class names of a vocabulary (`resolve`); a token of digits is an id.

No other filter language: globs and regular expressions are the standard library's. The module is shared: it imports
no stage, so train and eval filter with the one rule.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

REGEX_PREFIX = "re:"


class SubsetError(ValueError):
    """A filter that cannot be applied as given; the message names the option and the value."""


def shard_name(url: str) -> str:
    """The file name of a shard URL or path (what a pattern matches besides the key)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def _compile(option: str, pattern: str) -> re.Pattern:
    """A pattern as one compiled regex whose `search` is the pattern's match rule."""
    if pattern.startswith(REGEX_PREFIX):
        body = pattern[len(REGEX_PREFIX):]
        if not body:
            raise SubsetError(f"{option} {pattern!r}: empty regular expression (it would match every row)")
        try:
            return re.compile(body)
        except re.error as e:
            raise SubsetError(f"{option} {pattern!r}: not a valid regular expression ({e})") from None
    if not pattern:
        raise SubsetError(f"{option} '': empty pattern; give a glob such as 'shard-0000[0-4].tar' or 're:REGEX'")
    # translate anchors the end only (it is meant for re.match): \A anchors the start, so `search` is a whole match
    return re.compile(r"\A" + fnmatch.translate(pattern))


def parse_labels(values: Iterable[str]) -> tuple[int | str, ...]:
    """`--labels` values (repeatable, each comma separated) as tokens: class ids (ints) or class names."""
    out: list[int | str] = []
    for value in values:
        for token in str(value).split(","):
            token = token.strip()
            if not token:
                raise SubsetError(f"--labels {value!r}: empty class; give class ids or names separated by commas")
            out.append(int(token) if token.isdigit() else token)
    return tuple(out)


@dataclass(frozen=True)
class Subset:
    """What `--include`, `--exclude` and `--labels` select; the empty Subset keeps every row. `labels` holds class
    ids (ints) and, until `resolve`d against a vocabulary, class names."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    labels: tuple[int | str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "labels"):
            if isinstance(getattr(self, name), (str, int)):
                raise SubsetError(f"Subset.{name} takes a sequence of values, got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        # Compiled once here, so a bad pattern fails when the filter is made, before any data is read.
        object.__setattr__(self, "_include", tuple(_compile("--include", p) for p in self.include))
        object.__setattr__(self, "_exclude", tuple(_compile("--exclude", p) for p in self.exclude))
        for t in self.labels:
            if isinstance(t, bool) or not isinstance(t, (int, str)) or (isinstance(t, int) and t < 0):
                raise SubsetError(f"--labels {t!r}: a class is a non-negative id or a name")
        object.__setattr__(self, "_ids", frozenset(t for t in self.labels if isinstance(t, int)))

    def __bool__(self) -> bool:
        """Whether the filter selects anything at all (an empty Subset keeps every row)."""
        return bool(self.include or self.exclude or self.labels)

    @property
    def resolved(self) -> bool:
        return all(isinstance(t, int) for t in self.labels)

    @property
    def label_ids(self) -> tuple[int, ...]:
        """The class ids of `--labels`, ascending; only once names were resolved."""
        if not self.resolved:
            names = [t for t in self.labels if isinstance(t, str)]
            raise SubsetError(f"--labels {names}: class names must be resolved against a vocabulary first")
        return tuple(sorted(set(self.labels)))  # type: ignore[arg-type]

    def resolve(self, classes: Sequence[str] | None, *, where: str = "the vocabulary") -> Subset:
        """The same filter with `labels` as sorted unique class ids: names looked up in `classes` (exact match), ids
        checked against its size. `classes` None: there is no vocabulary, so only ids are accepted."""
        if not self.labels:
            return self
        ids: set[int] = set()
        for t in self.labels:
            if isinstance(t, int):
                if classes is not None and t >= len(classes):
                    raise SubsetError(f"--labels {t}: no such class id; {where} has {len(classes)} classes "
                                      f"(ids 0..{len(classes) - 1})")
                ids.add(t)
            elif classes is None:
                raise SubsetError(f"--labels {t!r}: a class name needs a vocabulary and {where} has none; give "
                                  "class ids (the .cls numbers)")
            elif t in classes:
                ids.add(list(classes).index(t))
            else:
                near = [c for c in classes if c.lower() == t.lower()]
                hint = (f"did you mean {near[0]!r}?" if near else
                        f"its classes: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}")
                raise SubsetError(f"--labels {t!r}: not a class of {where} ({hint})")
        return Subset(include=self.include, exclude=self.exclude, labels=tuple(sorted(ids)))

    def _matches(self, patterns: tuple[re.Pattern, ...], key: str, shard: str) -> bool:
        return any(p.search(key) or p.search(shard) for p in patterns)

    def keeps_name(self, *, key: str, shard: str) -> bool:
        """Whether --include/--exclude keep a row (its label not considered): decidable before a sample is decoded."""
        if self.include and not self._matches(self._include, key, shard):  # type: ignore[attr-defined]
            return False
        return not self._matches(self._exclude, key, shard)  # type: ignore[attr-defined]

    def keeps(self, *, key: str, shard: str, label: int | None = None) -> bool:
        """Whether the filter keeps one row (`label` None or negative: the row has none)."""
        if not self.keeps_name(key=key, shard=shard):
            return False
        if self.labels:
            return label is not None and label in self._ids  # type: ignore[attr-defined]
        return True

    def mask(self, keys: Sequence[str] | np.ndarray, *, shard: str, labels: np.ndarray | None = None) -> np.ndarray:
        """`keeps` of every row of one shard, as a bool array. A pattern that matches the shard name decides for all
        its rows at once, so excluding or including whole shards costs nothing per key."""
        n = len(keys)
        keep = np.ones(n, dtype=bool)
        if self.include:
            whole = [p for p in self._include if p.search(shard)]  # type: ignore[attr-defined]
            if not whole:
                keep = np.fromiter((any(p.search(k) for p in self._include)  # type: ignore[attr-defined]
                                    for k in _strs(keys)), dtype=bool, count=n)
        if self.exclude:
            if any(p.search(shard) for p in self._exclude):  # type: ignore[attr-defined]
                return np.zeros(n, dtype=bool)
            keep &= np.fromiter((not any(p.search(k) for p in self._exclude)  # type: ignore[attr-defined]
                                 for k in _strs(keys)), dtype=bool, count=n)
        if self.labels:
            if labels is None:
                raise SubsetError("--labels: these rows have no labels")
            keep &= np.isin(np.asarray(labels), np.asarray(self.label_ids, dtype=np.int64))
        return keep

    def excludes_shard(self, shard: str) -> bool:
        """Whether an --exclude pattern drops every row of this shard (it matches the shard's name)."""
        return any(p.search(shard) for p in self._exclude)  # type: ignore[attr-defined]

    def to_json(self) -> dict:
        """The filter as config.json and report.json record it (and a --resume compares it)."""
        return {"include": list(self.include), "exclude": list(self.exclude), "labels": list(self.labels)}

    def describe(self, classes: Sequence[str] | None = None) -> str:
        """One line for logs and errors: the filter as given, labels with their names when `classes` is known."""
        parts = [f"--include {p!r}" for p in self.include] + [f"--exclude {p!r}" for p in self.exclude]
        if self.labels:
            names = [f"{t} ({classes[t]})" if classes is not None and isinstance(t, int) and t < len(classes)
                     else str(t) for t in self.labels]
            parts.append("--labels " + ",".join(names))
        return " ".join(parts) if parts else "no filter"


def _strs(keys: Sequence[str] | np.ndarray) -> Iterable[str]:
    return keys.tolist() if isinstance(keys, np.ndarray) else keys


EVERYTHING = Subset()  # the empty filter: keeps every row
