"""Stored caption tokens: exactly what the student's tokenizer gives, reused only when provably so."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import CLASSES, build_cache
from open_clip.tokenizer import SimpleTokenizer

from kdcache import tokens as cache_tokens
from kdcache.cache import schema
from kdcache.cache.reader import open_cache
from kdcache.cache.verify import verify
from kdcache.synth import write_image_shards
from kdcache.train.dataspec import DataSpec
from kdcache.train.loader import make_loader

TRICKY = [
    "", "!", "!!! wow !!!", "a dog", "A  Photo\tof a CAT.", "caf\u00e9 &amp; cr\u00e8me", "it's <end_of_text> ok",
    "\u72ac\u3068\u732b", " ".join(["red circle"] * 40), "x " * 13, "x " * 14, "x " * 15, "!" * 100,
]


@pytest.fixture(scope="module")
def tok77():
    return SimpleTokenizer()


@pytest.mark.parametrize("ctx", [77, 16, 15, 14, 5, 2])
def test_fit_cuts_stored_rows_exactly_as_the_tokenizer_truncates(tok77, ctx):
    rows = cache_tokens.store(tok77(TRICKY), cache_tokens.describe(tok77))
    assert rows.dtype == np.uint16
    got = cache_tokens.fit(rows, ctx, eot=tok77.eot_token_id)
    want = SimpleTokenizer(context_length=ctx)(TRICKY).numpy()
    assert got.dtype == np.int64 and (got == want).all()


def test_reuse_only_when_the_tokenizer_provably_gives_the_same_tokens(tok77):
    rec = cache_tokens.describe(tok77)
    assert rec["context_length"] == 77 and rec["vocab_size"] == 49408
    assert cache_tokens.reusable_context(rec, SimpleTokenizer(context_length=16)) == 16
    assert cache_tokens.reusable_context(rec, SimpleTokenizer()) == 77
    assert cache_tokens.reusable_context(rec, SimpleTokenizer(context_length=78)) is None  # longer than stored
    assert cache_tokens.reusable_context(rec, SimpleTokenizer(clean="whitespace")) is None  # keeps case: other ids
    assert cache_tokens.reusable_context(rec, SimpleTokenizer(additional_special_tokens=["<x>"])) is None
    assert cache_tokens.reusable_context(rec, SimpleTokenizer(reduction_mask="simple")) is None

    class Custom(SimpleTokenizer):
        pass

    assert cache_tokens.reusable_context(rec, Custom()) is None and cache_tokens.describe(Custom()) is None
    assert cache_tokens.describe(SimpleTokenizer(reduction_mask="random")) is None
    assert cache_tokens.reusable_context(None, tok77) is None


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_spec):
    d = tmp_path_factory.mktemp("tokens")
    shards = write_image_shards(d / "shards", n_shards=2, per_shard=8, size=(48, 40), classes=CLASSES, seed=5)
    corpus = d / "tricky.txt"
    corpus.write_text("".join(t.replace("\t", " ") + "\n" for t in TRICKY if t), encoding="utf-8")
    out = d / "cache.zarr"
    assert build_cache(out, teacher=teacher_spec, images=shards, captions=(f"txt:{corpus}",), batch_size=8).ok
    return str(out)


def test_build_stores_the_teachers_tokens_and_verify_accepts_them(cache, teacher_spec):
    import open_clip

    c = open_cache(cache)
    teacher_tok = open_clip.get_tokenizer(teacher_spec)
    rec = c.attrs["build"]["tokens"]
    assert schema.CAP_TOKENS in c.capabilities and rec == cache_tokens.describe(teacher_tok)
    n = 0
    for u in c.units():
        name, text = ("tokens", "text") if u.kind == schema.CAPTIONS else ("caption_tokens", "caption")
        a = c.read(u, [name, text, "valid"])
        keep = a["valid"] & (a[text] != "")
        assert a[name].dtype == np.uint16 and a[name].shape[1] == rec["context_length"]
        assert (a[name][keep] == teacher_tok(a[text][keep].tolist()).numpy()).all()
        assert (a[name][~keep] == 0).all()
        n += int(keep.sum())
    assert n == 16 + len([t for t in TRICKY if t.strip()])
    assert verify(cache).ok


def test_verify_names_token_rows_that_do_not_match_their_captions(cache, tmp_path):
    import shutil

    import zarr

    bad = tmp_path / "bad.zarr"
    shutil.copytree(cache, bad)
    c = open_cache(str(bad))
    u = c.units(schema.CAPTIONS)[0]
    arr = zarr.open_group(str(bad), mode="r+")[u.data_path]["tokens"]
    rows = arr[...]
    valid = np.flatnonzero(c.read(u, ["valid"])["valid"])
    rows[valid[0]] = 0  # a caption whose tokens are gone
    arr[...] = rows
    problems = verify(str(bad)).problems
    assert any(f"{u.data_path}/tokens: rows [{valid[0]}] have a caption but no token sequence" in p for p in problems)


@pytest.mark.parametrize("ctx", [16, 6])
def test_text_loader_serves_stored_tokens_without_tokenising(cache, ctx):
    tok = SimpleTokenizer(context_length=ctx)
    reference = SimpleTokenizer(context_length=ctx)

    def refuse(text):
        raise AssertionError("the loader tokenised although the cache has the tokens")

    spec = DataSpec(cache=cache, tower="text", batch_size=4, val_fraction=0.0)
    loader = make_loader(spec, split="train", epoch=0, tokenizer=tok, return_texts=True)
    assert loader.dataset.token_context == ctx
    tok.encode = refuse  # probed already (reusable_context); from here on the tokenizer must not run
    batches = list(loader)
    assert batches and all(torch.equal(b["tokens"], reference(b["texts"])) for b in batches)


def test_another_tokenizer_is_run_as_before(cache):
    tok = SimpleTokenizer(context_length=16, clean="whitespace")
    spec = DataSpec(cache=cache, tower="text", batch_size=4, val_fraction=0.0)
    loader = make_loader(spec, split="train", epoch=0, tokenizer=tok, return_texts=True)
    assert loader.dataset.token_context is None
    assert all(torch.equal(b["tokens"], tok(b["texts"])) for b in loader)


def test_resume_of_a_cache_from_before_tokens_is_refused_naming_the_schema(cache, teacher_spec, tmp_path):
    """A 1.1 cache has no token arrays; extending it with 1.2 units would mix layouts, so --resume refuses."""
    import shutil

    import zarr

    from kdcache.cache.config import BuildError

    old = tmp_path / "old.zarr"
    shutil.copytree(cache, old)
    root = zarr.open_group(str(old), mode="r+")
    attrs = dict(root.attrs[schema.ROOT_ATTR])
    attrs.update(schema_version="1.1", build={k: v for k, v in attrs["build"].items() if k != "tokens"},
                 capabilities=[c for c in attrs["capabilities"] if c != schema.CAP_TOKENS])
    root.attrs[schema.ROOT_ATTR] = attrs
    c = open_cache(cache)
    with pytest.raises(BuildError, match=r"build changed \(tokens: cache has None.*schema 1\.1; this one writes "
                       + re.escape(schema.SCHEMA_VERSION)):
        build_cache(old, teacher=teacher_spec, images=tuple(c.attrs["inputs"]["images"]),
                    captions=tuple(c.attrs["inputs"]["captions"]), batch_size=8, resume=True)
    # Readers still take it: verify passes and the text loader tokenises, with the same batches.
    assert verify(str(old)).ok
    tok = SimpleTokenizer(context_length=16)
    loaders = [make_loader(DataSpec(cache=str(p), tower="text", batch_size=4, val_fraction=0.0), split="train",
                           epoch=0, tokenizer=tok) for p in (old, cache)]
    assert loaders[0].dataset.token_context is None and loaders[1].dataset.token_context == 16
    for a, b in zip(*loaders, strict=True):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["position"], b["position"])
