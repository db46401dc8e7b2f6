"""The import rules of ARCHITECTURE.md, enforced: every `import` in every kdcache module, lazy ones (inside
functions) included, is read from the source and checked against the rule of the module's layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kdcache

ROOT = Path(kdcache.__file__).parent

# Layer of a module: the longest matching prefix.
LAYERS = {
    "kdcache.cli": "cli",
    "kdcache.quickstart": "app",
    "kdcache.cache": "stage1",
    "kdcache.train": "train",
    "kdcache.online": "online",
    "kdcache.eval": "eval",
    "kdcache.export": "export",
    "kdcache.teacher": "teacher",
    "kdcache": "shared",  # shards, views, vocab, tokens, modelcfg, constants, precision, synth, __init__
}

# What each layer must never import (module prefixes), and the exceptions inside a forbidden package.
APP = ("kdcache.cli", "kdcache.quickstart")
FORBIDDEN = {
    "stage1": ("kdcache.train", "kdcache.eval", "kdcache.online", "kdcache.export", *APP),
    # Stage 2 reads the cache only through the reader and schema, and never builds a teacher.
    "train": ("kdcache.cache", "kdcache.teacher", "kdcache.online", "kdcache.eval", "kdcache.export", *APP),
    "online": ("kdcache.cache", "kdcache.eval", "kdcache.export", *APP),
    # Eval reads runs through the run directory module, never through the training loop or its data.
    "eval": ("kdcache.train", "kdcache.cache", "kdcache.online", "kdcache.export", *APP),
    "export": ("kdcache.train", "kdcache.cache", "kdcache.online", "kdcache.eval", *APP),
    "teacher": ("kdcache.cache", "kdcache.train", "kdcache.online", "kdcache.eval", "kdcache.export", *APP),
    "shared": ("kdcache.cache", "kdcache.train", "kdcache.online", "kdcache.eval", "kdcache.export", "kdcache.teacher",
               *APP),
    "app": ("kdcache.cli",),
    "cli": (),
}
READER = ("kdcache.cache.reader", "kdcache.cache.schema")
RUN_DIR = ("kdcache.train.rundir", "kdcache.train.config", "kdcache.train.students")
ALLOWED = {
    "train": READER,
    "online": (*READER, "kdcache.train"),  # online KD is the training loop with live targets
    "eval": (*READER, *RUN_DIR),
    "export": RUN_DIR,
}

MAX_LINES = 520  # "no module over ~500 lines"


def _module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _imports(path: Path, module: str, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement anywhere in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from kdcache.train import rundir` imports the module kdcache.train.rundir, not the package's contents
            if not (root.parent / Path(*target.split("."))).is_dir():
                found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


MODULES = sorted(ROOT.rglob("*.py"))


def _matches(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_follow_the_layer_rules(path):
    module = _module_name(path)
    layer = _layer(module)
    bad = [f"{path.relative_to(ROOT.parent)}:{line} imports {target} ({layer} must not import {prefix})"
           for line, target in _imports(path, module) if target.startswith("kdcache")
           for prefix in FORBIDDEN[layer] if _matches(target, prefix) and not _matches(module, prefix)
           and not any(_matches(target, ok) for ok in ALLOWED.get(layer, ()))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_no_module_is_too_long(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT.parent)} has {n} lines; split it by responsibility"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # The rules are only as good as the scan: a lazy import inside a function and a relative import both count.
    pkg = tmp_path / "kdcache" / "train"
    pkg.mkdir(parents=True)
    src = pkg / "probe.py"
    src.write_text("def f():\n    from kdcache.teacher import load_teacher\n\nfrom ..online import loop\n"
                   "from kdcache.cache import build\n")
    targets = {t for _, t in _imports(src, _module_name(src, tmp_path / "kdcache"), tmp_path / "kdcache")}
    assert {"kdcache.teacher", "kdcache.online.loop", "kdcache.cache.build"} <= targets
    assert _layer("kdcache.train.probe") == "train"
    assert any(_matches("kdcache.online.loop", p) for p in FORBIDDEN["train"])
    assert any(_matches("kdcache.cache.build", p) for p in FORBIDDEN["train"])
