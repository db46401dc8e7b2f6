"""The cache proves its own content and readers fail closed (issue 10): a chunk copied from another unit, a deleted
chunk, status or unit group, garbage bytes in a chunk or an edited array shape is refused by `verify`, by `train`
and by the other readers with a one-line message naming the unit and array (never fill values, never a traceback).
Caches built before content digests (schema 1.3) still read, and `verify` says what it cannot check there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import build_cache

from kdcache.cache import schema
from kdcache.cache.reader import CacheError, open_cache
from kdcache.cache.verify import info, verify
from kdcache.cli.main import cli
from kdcache.shards import ShardReport, iter_shard

UNIT0 = "images-00000"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_spec, shards, classes_file) -> Path:
    """Two labelled, captioned shards, two views, top-k logits: every array the tamper cases touch."""
    out = tmp_path_factory.mktemp("tamper") / "ref.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards[:2]), views=2, classes=classes_file,
                       templates="photo", topk=2, batch_size=4).ok
    return out


def _copy(reference: Path, tmp_path: Path, name: str = "bad.zarr") -> Path:
    return Path(shutil.copytree(reference, tmp_path / name))


def _chunks(cache: Path, unit: str, array: str) -> list[Path]:
    return sorted(p for p in (cache / "images" / unit / array / "c").rglob("*") if p.is_file())


def _verify_cli(cache: Path):
    return CliRunner().invoke(cli, ["verify", str(cache), "--no-progress"])


def _train_cli(cache: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["train", "--cache", str(cache), "--tower", "image", "--student", "kdc-tiny-image",
                                    "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--threads", "1",
                                    "--no-progress", *extra])


def _refused(r, *words: str) -> str:
    """The one-line error of a command that must refuse: exit 1, each of `words` in it, no traceback."""
    assert r.exit_code == 1, r.output
    assert not (r.exception and not isinstance(r.exception, SystemExit)), repr(r.exception)
    assert "Traceback" not in r.output, r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith(("Error:", "PROBLEM"))][:1] or [r.output]
    for w in words:
        assert w in line, (w, r.output)
    return line


def test_a_good_cache_records_a_digest_of_every_array(reference):
    cache = open_cache(str(reference))
    for unit in cache.all_units:
        st = cache.status(unit)
        assert sorted(st[schema.DIGEST_KEY]) == sorted(cache.unit_specs(unit))
        got = zarr.open_group(str(reference), mode="r")[unit.data_path]
        for name, want in st[schema.DIGEST_KEY].items():
            assert schema.array_digest(got[name][...]) == want, name
    vocab = zarr.open_group(str(reference), mode="r")[schema.VOCAB]
    assert sorted(dict(vocab.attrs)[schema.DIGEST_KEY]) == ["classes", "head", "templates"]
    rep = verify(str(reference), progress=False)
    assert rep.ok and not rep.notes, (rep.problems, rep.notes)


@pytest.mark.parametrize("array", ["emb", "label", "view_box", "view_flip", "topk_idx", "caption_emb"])
def test_a_chunk_copied_from_another_unit_is_refused(tmp_path, reference, array):
    bad = _copy(reference, tmp_path)
    (src,), (dst,) = _chunks(bad, "00001", array), _chunks(bad, "00000", array)
    assert src.read_bytes() != dst.read_bytes()  # else the swap would change nothing
    shutil.copyfile(src, dst)
    _refused(_verify_cli(bad), UNIT0, f"images/00000/{array}", "content digest")
    _refused(_train_cli(bad, tmp_path / "run"), UNIT0, f"images/00000/{array}", "content digest")


def test_the_fix_the_message_gives_rebuilds_the_unit(tmp_path, reference, teacher_spec, shards, classes_file):
    bad = _copy(reference, tmp_path)
    shutil.copyfile(_chunks(bad, "00001", "emb")[0], _chunks(bad, "00000", "emb")[0])
    line = _refused(_verify_cli(bad), UNIT0)
    assert "does not match" in line
    r = _train_cli(bad, tmp_path / "run")
    assert f"delete {schema.STATUS}/{UNIT0} in the cache and rerun the same `kdcache build` with --resume" in r.output
    shutil.rmtree(bad / schema.STATUS / UNIT0)
    res = build_cache(bad, teacher=teacher_spec, images=tuple(shards[:2]), views=2, classes=classes_file,
                      templates="photo", topk=2, batch_size=4, resume=True)
    assert res.ok and res.summary["this_run"]["images"] == 10  # only the damaged unit was built again
    assert verify(str(bad), progress=False).ok
    assert (_chunks(bad, "00000", "emb")[0].read_bytes() == _chunks(reference, "00000", "emb")[0].read_bytes())


def test_a_copied_chunk_is_refused_by_train_workers_in_one_line(tmp_path, reference):
    bad = _copy(reference, tmp_path)
    shutil.copyfile(_chunks(bad, "00001", "emb")[0], _chunks(bad, "00000", "emb")[0])
    line = _refused(_train_cli(bad, tmp_path / "run", "--workers", "2"), UNIT0, "images/00000/emb", "content digest")
    assert "DataLoader worker" not in line


def test_eval_agreement_refuses_a_copied_chunk(tmp_path, reference, shards):
    from kdcache.eval.run import cache_reference

    bad = _copy(reference, tmp_path)
    shutil.copyfile(_chunks(bad, "00001", "emb")[0], _chunks(bad, "00000", "emb")[0])
    samples = list(iter_shard(shards[0], ShardReport(shards[0])))
    kw = {"urls": [shards[0]] * len(samples), "positions": [s.position for s in samples],
          "keys": [s.key for s in samples],
          "task": SimpleNamespace(cache_arrays=(), add_cache_reference=lambda ref, cache, arrays: "")}
    ref, _ = cache_reference(str(reference), **kw)
    assert ref["image_emb"].shape[0] == len(samples)
    with pytest.raises(CacheError, match="unit images-00000 .*images/00000/emb does not match the content digest"):
        cache_reference(str(bad), **kw)


def test_an_edited_vocabulary_is_refused(tmp_path, reference):
    bad = _copy(reference, tmp_path)
    classes = zarr.open_group(str(bad), mode="r+")[schema.VOCAB]["classes"]
    classes[0] = "not-red"  # a valid chunk with other content: checksums cannot see it, the digest does
    _refused(_verify_cli(bad), "vocab", "vocab/classes", "content digest")
    with pytest.raises(CacheError, match="class vocabulary: array vocab/classes does not match"):
        open_cache(str(bad)).vocab()


@pytest.mark.parametrize("array", ["emb", "valid", "label"])
def test_a_deleted_chunk_is_an_error_not_fill_values(tmp_path, reference, array):
    bad = _copy(reference, tmp_path)
    (chunk,) = _chunks(bad, "00000", array)
    chunk.unlink()
    key = chunk.relative_to(bad).as_posix()
    _refused(_verify_cli(bad), UNIT0, f"chunk {key} is missing")
    _refused(_train_cli(bad, tmp_path / "run"), UNIT0, f"chunk {key} is missing", "--resume")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_deleted_status_in_a_complete_cache_is_refused(tmp_path, reference):
    bad = _copy(reference, tmp_path)
    shutil.rmtree(bad / schema.STATUS / UNIT0)
    _refused(_verify_cli(bad), UNIT0, "no status object")
    _refused(_train_cli(bad, tmp_path / "run"), UNIT0, "no status object", "says complete")
    with pytest.raises(CacheError, match="images-00000 .*no status object"):
        open_cache(str(bad)).read(open_cache(str(bad)).units(schema.IMAGES)[0], ["emb"])


def test_a_missing_unit_group_is_a_message_not_a_key_error(tmp_path, reference):
    bad = _copy(reference, tmp_path)
    shutil.rmtree(bad / "images" / "00000")
    _refused(_verify_cli(bad), UNIT0, "group images/00000 is missing")
    _refused(_train_cli(bad, tmp_path / "run"), UNIT0, "group images/00000 is missing")
    r = CliRunner().invoke(cli, ["info", str(bad)])
    _refused(r, "images/00000", "kdcache verify")


def test_a_garbage_chunk_is_a_message_not_a_zstd_traceback(tmp_path, reference):
    bad = _copy(reference, tmp_path)
    (chunk,) = _chunks(bad, "00000", "emb")
    chunk.write_bytes(b"not a zstd frame" * 8)
    key = chunk.relative_to(bad).as_posix()
    _refused(_verify_cli(bad), UNIT0, f"chunk {key} cannot be decoded")
    _refused(_train_cli(bad, tmp_path / "run"), UNIT0, f"chunk {key} cannot be decoded")


@pytest.mark.parametrize("axis, value, says", [(1, 3, "the schema wants (rows, 2,"), (0, 5, "status says 10 rows")])
def test_an_edited_array_shape_is_a_message(tmp_path, reference, axis, value, says):
    bad = _copy(reference, tmp_path)
    meta = bad / "images/00000/emb/zarr.json"
    m = json.loads(meta.read_text())
    m["shape"][axis] = value
    meta.write_text(json.dumps(m))
    _refused(_verify_cli(bad), UNIT0, "images/00000/emb has shape", says)
    _refused(_train_cli(bad, tmp_path / "run"), UNIT0, "images/00000/emb has shape", says)


def _as_schema_1_3(cache: Path) -> None:
    """What a cache built before content digests looks like: no digests in statuses or vocab, version 1.3."""
    root = zarr.open_group(str(cache), mode="r+")
    for _, g in root[schema.STATUS].groups():
        g.attrs.put({k: v for k, v in dict(g.attrs).items() if k != schema.DIGEST_KEY})
    vocab = root[schema.VOCAB]
    vocab.attrs.put({k: v for k, v in dict(vocab.attrs).items() if k != schema.DIGEST_KEY})
    root.attrs[schema.ROOT_ATTR] = {**dict(root.attrs)[schema.ROOT_ATTR], "schema_version": "1.3"}


def test_a_1_3_cache_without_digests_still_reads_and_verify_says_so(tmp_path, reference):
    old = _copy(reference, tmp_path, "old.zarr")
    _as_schema_1_3(old)
    r = _verify_cli(old)
    assert r.exit_code == 0, r.output
    assert "NOTE 2 of 2 units have no content digests" in r.output
    assert "no content digests" in CliRunner().invoke(cli, ["info", str(old)]).output
    c = open_cache(str(old))
    a = c.read(c.units(schema.IMAGES)[0], ["emb", "valid"])
    assert np.isfinite(a["emb"][a["valid"]]).all()
    r = _train_cli(old, tmp_path / "run")
    assert r.exit_code == 0, r.output
    # Without digests a copied chunk cannot be seen (verify says so above), but every other check still runs:
    (chunk,) = _chunks(old, "00000", "label")
    chunk.unlink()
    _refused(_verify_cli(old), UNIT0, "images/00000/label/c/0 is missing")
    assert info(str(old))["content_digests"] == {"units": 2, "without": 2}
