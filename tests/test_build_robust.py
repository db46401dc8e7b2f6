"""Determinism, resume after kill -9, parallel ranks and workers, bad input, and verify."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import assert_identical_caches, build_cache
from PIL import Image

from kdcache.cache import schema
from kdcache.cache.reader import open_cache
from kdcache.cache.verify import verify
from kdcache.cli.main import cli


def _cli_args(out, teacher_spec, shards, classes_file, *extra):
    args = ["build", "--teacher", teacher_spec, "--out", str(out), "--views", "2", "--classes", classes_file,
            "--templates", "photo", "--batch-size", "4", "--threads", "1", "--no-progress"]
    for s in shards:
        args += ["--images", s]
    return args + list(extra)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    from kdcache.synth import write_image_shards

    return write_image_shards(tmp_path_factory.mktemp("many"), n_shards=10, per_shard=8, seed=5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_spec, many_shards, classes_file):
    """An uninterrupted single-process build, run through the CLI as users run it."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    r = CliRunner().invoke(cli, _cli_args(out, teacher_spec, many_shards, classes_file))
    assert r.exit_code == 0, r.output
    return out


def _statuses_done(out: Path) -> int:
    d = out / schema.STATUS
    return len(list(d.iterdir())) if d.exists() else 0


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_identical_cache(tmp_path, teacher_spec, many_shards, classes_file, reference):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "kdcache.cli.main", *_cli_args(out, teacher_spec, many_shards, classes_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _statuses_done(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _statuses_done(out)
    assert 0 < done < len(many_shards), f"kill landed outside the build ({done} units done)"
    r = CliRunner().invoke(cli, _cli_args(out, teacher_spec, many_shards, classes_file, "--resume"))
    assert r.exit_code == 0, r.output
    assert_identical_caches(out, reference)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_completes(tmp_path, teacher_spec, many_shards, classes_file, reference):
    out = tmp_path / "interrupted.zarr"
    cmd = [sys.executable, "-m", "kdcache.cli.main", *_cli_args(out, teacher_spec, many_shards, classes_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _statuses_done(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    done = _statuses_done(out)
    assert 0 < done < len(many_shards), f"the interrupt landed outside the build ({done} units done)"
    assert proc.returncode == 130, err[-2000:]
    assert "rerun with --resume" in err and "Traceback" not in err
    r = CliRunner().invoke(cli, _cli_args(out, teacher_spec, many_shards, classes_file, "--resume"))
    assert r.exit_code == 0, r.output
    assert_identical_caches(out, reference)


@pytest.mark.slow
def test_workers_do_not_change_the_cache(tmp_path, teacher_spec, many_shards, classes_file, reference):
    out = tmp_path / "workers.zarr"
    r = CliRunner().invoke(cli, _cli_args(out, teacher_spec, many_shards, classes_file, "--workers", "2"))
    assert r.exit_code == 0, r.output
    assert_identical_caches(out, reference)


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one_process(tmp_path, teacher_spec, many_shards, classes_file, reference):
    out = tmp_path / "ranks.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--module", "kdcache.cli.main", *_cli_args(out, teacher_spec, many_shards, classes_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_identical_caches(out, reference)
    assert open_cache(str(out)).attrs["run"]["world_size"] == 2


def test_appending_a_shard_with_resume(tmp_path, teacher_spec, many_shards, classes_file, reference):
    out = tmp_path / "append.zarr"
    r = CliRunner().invoke(cli, _cli_args(out, teacher_spec, many_shards[:-1], classes_file))
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, _cli_args(out, teacher_spec, many_shards, classes_file, "--resume"))
    assert r.exit_code == 0, r.output
    assert_identical_caches(out, reference)


def _write_units(path: str, units: list[int], rows: int, dim: int) -> None:
    root = zarr.open_group(path, mode="r+")
    specs = schema.caption_arrays(dim=dim, embed_dtype="fp16")
    for u in units:
        unit = schema.Unit(schema.CAPTIONS, 0, "stress", block=u, start=u * rows, stop=(u + 1) * rows)
        data = schema.empty_unit_data(specs, rows)
        data["index"][:] = np.arange(unit.start, unit.stop)
        data["valid"][:] = True
        data["text"][:] = [f"row {i}" for i in range(unit.start, unit.stop)]
        data["emb"][:] = (np.arange(unit.start, unit.stop)[:, None] % 2048).astype(np.float16)
        schema.write_unit(root, unit, specs, data)
        schema.write_status(root, unit, {"unit": unit.name, "rows": rows})


def test_resume_removes_temporaries_of_an_interrupted_write(tmp_path, teacher_spec, shards):
    """zarr writes `<name>.<hex>.partial` and renames it; kill -9 in between leaves it, and zarr's member listing then
    fails on it. verify names it; --resume removes it."""
    import uuid

    out = tmp_path / "partial.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards)).ok
    left = [out / f"zarr.{uuid.uuid4().hex}.partial", out / "images" / f"zarr.{uuid.uuid4().hex}.partial"]
    for p in left:
        p.write_bytes(b'{"zarr_format": 3')
    with pytest.raises((KeyError, zarr.errors.ZarrUserWarning)):  # zarr warns, then fails, on the stray file
        dict(zarr.open_group(str(out), mode="r")["images"].groups())
    problems = verify(str(out), progress=False).problems
    assert sum("interrupted write" in p for p in problems) == 2
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards), resume=True).ok
    assert not any(p.exists() for p in left)
    assert len(dict(zarr.open_group(str(out), mode="r")["images"].groups())) == len(shards)
    assert verify(str(out), progress=False).ok


def test_two_processes_writing_units_lose_no_rows(tmp_path):
    """Two writer processes at real chunk sizes (embedding chunks of ~1 MiB): units never share a chunk, so no row
    is lost — unlike two processes writing disjoint rows of one zarr chunk."""
    path = str(tmp_path / "stress.zarr")
    zarr.open_group(path, mode="w")
    rows, dim, n_units = 3000, 512, 8
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_units, args=(path, list(range(r, n_units, 2)), rows, dim)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    root = zarr.open_group(path, mode="r")
    assert schema.chunk_rows(schema.caption_arrays(dim=dim, embed_dtype="fp16")["emb"], rows) == 1024
    for u in range(n_units):
        g = root[f"{schema.CAPTIONS}/000/{u:06d}"]
        idx = np.arange(u * rows, (u + 1) * rows)
        assert (g["index"][...] == idx).all()
        assert (g["emb"][...][:, 0] == (idx % 2048).astype(np.float16)).all()
        assert g["text"][...].tolist() == [f"row {i}" for i in idx]


# ------------------------------------------------------------------------------------------------------ bad input

class _SideEffect:
    path = ""

    def __reduce__(self):
        return (Path(self.path).touch, ())


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpg(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def bad_shard(tmp_path):
    from kdcache.synth import write_tar

    marker = tmp_path / "unpickled"
    evil = _SideEffect()
    _SideEffect.path = str(marker)
    payload = pickle.dumps(evil)
    ramp = np.linspace(0, 65535, 40 * 30).astype("<u2")
    grey16 = Image.frombytes("I;16", (40, 30), ramp.tobytes())
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    members = [
        ("a000.jpg", _jpg()), ("a000.cls", b"0"), ("a000.txt", b"a photo of a red."),
        ("a001.jpg", b""),                                            # zero bytes
        ("a002.jpg", b"<html><body>Not found</body></html>"),         # HTML saved as .jpg
        ("a003.jpg", _jpg()[:200]),                                   # truncated JPEG
        ("a004.txt", b"caption without image"),                       # no image
        ("a005.pyd", payload), ("a005.jpg", _jpg((10, 200, 10))),     # pickle member never unpickled
        ("a006.png", _png(grey16)), ("a006.cls", b"1"),               # 16-bit: scaled, not saturated
        ("a007.png", _png(rgba)),                                     # transparent: composited onto white
        ("a008.cls", b"2"), ("a008.jpg", _jpg((10, 10, 200))),        # members in any order
    ]
    return write_tar(tmp_path / "bad.tar", members), marker


def test_bad_samples_are_rejected_counted_and_rows_stay_put(tmp_path, bad_shard, teacher_spec, classes_file):
    shard, marker = bad_shard
    out = tmp_path / "bad.zarr"
    res = build_cache(out, teacher=teacher_spec, images=(shard,), classes=classes_file)
    assert res.ok, res.summary
    assert not marker.exists(), "a .pyd member was unpickled"
    c = open_cache(str(out))
    unit = c.units("images")[0]
    st = c.status(unit)
    assert st["rows"] == 9 and st["valid"] == 5
    assert st["rejected"] == {"empty_image": 1, "undecodable": 2, "no_image": 1}
    by_pos = {r["position"]: r["reason"] for r in st["rejects"]}
    assert by_pos == {1: "empty_image", 2: "undecodable", 3: "undecodable", 4: "no_image"}
    d = c.read(unit)
    assert d["key"].tolist() == [f"a{i:03d}" for i in range(9)]
    assert d["valid"].tolist() == [True, False, False, False, False, True, True, True, True]
    assert np.isnan(d["emb"][1:5].astype(np.float32)).all() and np.isfinite(d["emb"][5:].astype(np.float32)).all()
    assert d["label"].tolist() == [0, -1, -1, -1, -1, -1, 1, -1, 2]
    assert c.attrs["summary"]["rejected"] == st["rejected"]
    assert verify(str(out), progress=False).ok


def _cut(src: str, dst: Path, nbytes: int) -> str:
    dst.write_bytes(Path(src).read_bytes()[:nbytes])
    return str(dst)


@pytest.mark.parametrize("where", ["inside_member", "block_boundary"])
def test_truncated_shard_fails_loudly_and_keeps_complete_samples(tmp_path, where, teacher_spec, shards):
    import tarfile

    with tarfile.open(shards[1]) as tf:
        members = tf.getmembers()
    third_img = [m for m in members if m.name.endswith(".jpg")][3]
    if where == "inside_member":
        cut = third_img.offset_data + third_img.size // 2       # inside sample 3's image
    else:
        cut = third_img.offset                                  # a 512-byte boundary: tarfile raises nothing
    bad = _cut(shards[1], tmp_path / "cut.tar", cut)
    out = tmp_path / "trunc.zarr"
    r = CliRunner().invoke(cli, ["build", "--teacher", teacher_spec, "--out", str(out), "--images", shards[0],
                                 "--images", bad, "--images", shards[2], "--no-progress", "--threads", "1"])
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output and "images-00001" in r.output
    c = open_cache(str(out), allow_incomplete=True)
    assert c.attrs["status"] == "incomplete"
    st = c.status(c.units("images")[1])
    assert st["state"] == "failed" and st["truncated"]
    assert st["valid"] == 3  # samples 0..2 are complete and kept
    assert [c.status(u)["state"] for u in c.units("images")] == ["done", "failed", "done"]
    if where == "inside_member":
        assert st["rejected"].get("incomplete_sample") == 1
    with pytest.raises(Exception, match="incomplete"):
        open_cache(str(out))
    assert not verify(str(out), progress=False).ok


# ---------------------------------------------------------------------------------------------------------- verify

def test_verify_passes_on_a_good_cache(reference):
    rep = verify(str(reference), progress=False)
    assert rep.ok, rep.problems
    r = CliRunner().invoke(cli, ["verify", str(reference), "--no-progress"])
    assert r.exit_code == 0 and "OK" in r.output


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_catches_a_flipped_byte(tmp_path, reference):
    bad = _copy(reference, tmp_path / "flip.zarr")
    chunk = bad / "images/00003/emb/c/0/0/0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    r = CliRunner().invoke(cli, ["verify", str(bad), "--no-progress"])
    assert r.exit_code == 1
    assert "images/00003/emb" in r.output and "images-00003" in r.output


def test_verify_catches_a_deleted_chunk(tmp_path, reference):
    bad = _copy(reference, tmp_path / "del.zarr")
    (bad / "images/00004/topk_val/c/0/0/0").unlink()
    r = CliRunner().invoke(cli, ["verify", str(bad), "--no-progress"])
    assert r.exit_code == 1
    assert "images/00004/topk_val/c/0/0/0 is missing" in r.output


def test_info_reports_counts_and_sizes(reference):
    r = CliRunner().invoke(cli, ["info", str(reference), "--json"])
    assert r.exit_code == 0, r.output
    import json

    d = json.loads(r.output)
    assert d["status"] == "complete" and d["images"]["samples"] == 80 and d["views"] == 2
    assert d["bytes_on_disk"] > 0 and d["compression_ratio"] > 0 and d["classes"]["count"] == 3
    r = CliRunner().invoke(cli, ["info", str(reference)])
    assert "80 samples in 10 shards" in r.output
