"""One writer per cache and per run directory (kdcache.locks), and a run whose cache is extended under it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner
from conftest import assert_identical_caches, build_cache, cache_arrays
from safetensors.torch import load_file

from kdcache import locks
from kdcache.cache import schema
from kdcache.cache.config import BuildError
from kdcache.cache.reader import CacheError
from kdcache.cli.main import cli
from kdcache.locks import LockError, WriterLock
from kdcache.train import rundir
from kdcache.train.config import TrainConfig, TrainError
from kdcache.train.loop import run as train


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(target: Path, **fields) -> Path:
    h = {"host": socket.gethostname(), "pid": os.getpid(), "command": "kdcache build --out x", "started": time.time(),
         "token": "f" * 32, **fields}
    path = Path(locks.lock_path(target))
    path.write_text(json.dumps(h))
    return path


# ------------------------------------------------------------------------------------------------ the lock itself

def test_lock_records_its_holder_refuses_a_second_and_is_released(tmp_path):
    target = tmp_path / "c.zarr"
    with WriterLock(target, what="cache", command="kdcache build --out c.zarr") as lock:
        rec = json.loads(Path(lock.path).read_text())
        assert lock.path == str(tmp_path / "c.zarr.lock")
        assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid()
        assert rec["command"] == "kdcache build --out c.zarr" and abs(rec["started"] - time.time()) < 60
        if Path("/proc/self/stat").exists():
            assert rec["pid_start"] and rec["boot_id"]
        # a second writer, even in this very process, is refused naming the holder
        with pytest.raises(LockError, match=rf"cache .*c\.zarr is in use by `kdcache build --out c\.zarr` "
                                            rf"\(pid {os.getpid()} on {socket.gethostname()}, since "):
            WriterLock(target, what="cache").acquire()
        assert locks.live_holder(target).token == rec["token"]
    assert not Path(lock.path).exists() and locks.holder_of(target) is None
    assert list(tmp_path.iterdir()) == []  # no temporary file left next to it


def test_a_lock_held_by_another_process_is_refused_then_taken_over_after_kill_9(tmp_path, caplog):
    target = tmp_path / "run"
    code = ("import sys, time; from kdcache.locks import WriterLock; "
            f"WriterLock({str(target)!r}, what='run directory', command='kdcache train --out run').acquire(); "
            "print('ready', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(LockError, match=rf"run directory .* is in use by `kdcache train --out run` \(pid {p.pid}"):
            WriterLock(target, what="run directory").acquire()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    with caplog.at_level(logging.WARNING, logger="kdcache.locks"), WriterLock(target, what="run directory") as lock:
        assert json.loads(Path(lock.path).read_text())["pid"] == os.getpid()
    assert f"took over the stale lock of `kdcache train --out run` (pid {p.pid}" in caplog.text


def test_stale_locks_dead_pid_reused_pid_and_reboot(tmp_path, caplog):
    target = tmp_path / "c.zarr"
    cases = [{"pid": _dead_pid()}]
    if Path("/proc/self/stat").exists():
        cases += [{"pid": os.getpid(), "pid_start": "1"},                 # our pid, but another process's start time
                  {"pid": os.getpid(), "boot_id": "not-this-boot"}]      # taken before a reboot
    for fields in cases:
        _write_lock(target, **fields)
        assert locks.is_stale(locks.holder_of(target)) is True
        assert locks.live_holder(target) is None
        with caplog.at_level(logging.WARNING, logger="kdcache.locks"):
            WriterLock(target, what="cache").acquire().release()
        assert "took over the stale lock" in caplog.text
        caplog.clear()


def test_a_lock_from_another_host_is_held_and_the_message_says_what_to_delete(tmp_path):
    target = tmp_path / "c.zarr"
    path = _write_lock(target, host="elsewhere", pid=_dead_pid())
    assert locks.is_stale(locks.holder_of(target)) is None
    with pytest.raises(LockError, match=rf"on elsewhere.*another host.*delete {path}"):
        WriterLock(target, what="cache").acquire()
    assert path.exists()


def test_an_unreadable_lock_is_waited_for_then_removed(tmp_path, monkeypatch):
    target = tmp_path / "c.zarr"
    path = Path(locks.lock_path(target))
    path.write_text("{")
    monkeypatch.setattr(locks, "UNREADABLE_GRACE_S", 0.0)
    WriterLock(target, what="cache").acquire().release()
    assert not path.exists()


def test_a_forked_child_never_releases_its_parents_lock(tmp_path):
    lock = WriterLock(tmp_path / "c.zarr", what="cache").acquire()
    lock._owner_pid = -1  # what a forked DataLoader worker sees
    lock.release()
    assert Path(lock.path).exists()


def test_object_store_locks_are_best_effort_and_never_delete_anothers(monkeypatch):
    pytest.importorskip("fsspec")
    monkeypatch.setattr(locks, "SETTLE_S", 0.0)
    url = "memory://bucket/locks-test/c.zarr"
    with pytest.raises(LockError, match="bucket itself"):
        locks.lock_path("memory://bucket")
    with WriterLock(url, what="cache") as lock:
        assert lock.path == url + ".lock"
        with pytest.raises(LockError, match="is in use by"):
            WriterLock(url, what="cache").acquire()
    assert locks.holder_of(url) is None
    # a race: another writer's lock lands while ours settles: we back off and leave theirs in place
    theirs = locks.new_holder("kdcache build (the other one)")
    remote = locks._files(url)
    monkeypatch.setattr(locks.time, "sleep", lambda s: remote.fs.pipe_file(remote.key, theirs.to_json().encode()))
    with pytest.raises(LockError, match=r"the other one"):
        WriterLock(url, what="cache").acquire()
    assert locks.holder_of(url).token == theirs.token


# ----------------------------------------------------------------------------------------------------- the build

def _build_args(out, teacher_spec, shards, classes_file, *extra):
    args = ["build", "--teacher", teacher_spec, "--out", str(out), "--classes", classes_file, "--templates", "photo",
            "--batch-size", "4", "--threads", "1", "--no-progress"]
    for s in shards:
        args += ["--images", s]
    return args + list(extra)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, teacher_spec, shards, classes_file):
    out = tmp_path_factory.mktemp("locks") / "ref.zarr"
    r = CliRunner().invoke(cli, _build_args(out, teacher_spec, shards[:2], classes_file))
    assert r.exit_code == 0, r.output
    return out


def test_a_build_is_refused_while_another_holds_the_cache_and_the_first_cache_is_intact(
        tmp_path, small_cache, teacher_spec, shards, classes_file):
    before = cache_arrays(small_cache)
    with WriterLock(small_cache, what="cache", command="kdcache build --out ref.zarr (the first)"):
        for mode in ("--overwrite", "--resume"):
            r = CliRunner().invoke(cli, _build_args(small_cache, teacher_spec, shards[:2], classes_file, mode))
            assert r.exit_code == 1, r.output
            assert r.output.startswith("Error: cache ") and "(the first)` (pid " in r.output, r.output
            assert "Traceback" not in r.output
        new = tmp_path / "new.zarr"
        with WriterLock(new, what="cache", command="kdcache build --out new.zarr"):
            with pytest.raises(BuildError, match="is in use by"):
                build_cache(new, teacher=teacher_spec, images=tuple(shards[:1]))
        assert not new.exists()  # refused before anything was created
    after = cache_arrays(small_cache)
    assert sorted(after) == sorted(before) and all((after[k] == before[k]).all() for k in before)
    assert locks.holder_of(small_cache) is None


def test_two_real_build_processes_on_one_out_the_second_is_refused_and_the_first_completes(
        tmp_path, small_cache, teacher_spec, shards, classes_file):
    """Two `kdcache build` processes on one --out, the second with --overwrite while the first is mid-build (frozen
    with SIGSTOP once its lock exists, so the overlap is certain): the second exits 1 naming the first's pid and
    touches nothing; the first, resumed, completes the same cache an undisturbed build makes, and verify passes."""
    import signal

    out = tmp_path / "c.zarr"
    cmd = [sys.executable, "-m", "kdcache.cli.main", *_build_args(out, teacher_spec, shards[:2], classes_file)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock, deadline = Path(f"{out}.lock"), time.monotonic() + 120
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # holding its lock, mid-build
    try:
        second = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    said = second.stdout + second.stderr
    assert second.returncode == 1 and f"pid {first.pid}" in said and "Traceback" not in said, said
    printed = first.communicate(timeout=300)[0]
    assert first.returncode == 0 and "complete" in printed, printed
    assert_identical_caches(out, small_cache)
    r = CliRunner().invoke(cli, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    assert locks.holder_of(out) is None


def test_a_build_takes_over_a_stale_lock_and_releases_its_own_on_error(tmp_path, teacher_spec, shards, caplog):
    out = tmp_path / "c.zarr"
    _write_lock(out, pid=_dead_pid())
    with caplog.at_level(logging.WARNING, logger="kdcache.locks"):
        assert build_cache(out, teacher=teacher_spec, images=tuple(shards[:1])).ok
    assert "took over the stale lock" in caplog.text
    assert locks.holder_of(out) is None
    with pytest.raises(BuildError, match="already exists"):  # an error after the lock was taken
        build_cache(out, teacher=teacher_spec, images=tuple(shards[:1]))
    assert locks.holder_of(out) is None


def test_out_is_a_file(tmp_path, teacher_spec, shards, small_cache):
    f = tmp_path / "file"
    f.write_text("not a cache")
    r = CliRunner().invoke(cli, ["build", "--teacher", teacher_spec, "--images", shards[0], "--out", str(f),
                                 "--no-progress"])
    assert r.exit_code == 1 and r.output.startswith(f"Error: --out {f} is a file"), r.output
    r = CliRunner().invoke(cli, ["build", "--teacher", teacher_spec, "--images", shards[0], "--out", str(f / "c.zarr"),
                                 "--no-progress"])
    assert r.exit_code == 1 and "is a file" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(cli, ["train", "--cache", str(small_cache), "--tower", "image", "--student",
                                 "kdc-tiny-image", "--out", str(f), "--max-steps", "1", "--no-progress"])
    assert r.exit_code == 1 and r.output.startswith(f"Error: --out {f} is a file, not a run directory"), r.output
    assert f.read_text() == "not a cache"


# ----------------------------------------------------------------------------------------------------- training

def _cfg(cache, out, **kw) -> TrainConfig:
    base = {"tower": "image", "student": "kdc-tiny-image", "max_steps": 6, "batch_size": 4, "progress": False,
            "threads": 1, "checkpoint_every": 2, "val_fraction": 0.0}
    return TrainConfig(cache=str(cache), out=str(out), **{**base, **kw})


def test_a_second_train_on_one_out_is_refused(tmp_path, small_cache):
    out = tmp_path / "run"
    with WriterLock(out, what="run directory", command="kdcache train --out run --seed 0"):
        r = CliRunner().invoke(cli, ["train", "--cache", str(small_cache), "--tower", "image", "--student",
                                     "kdc-tiny-image", "--out", str(out), "--max-steps", "1", "--seed", "1",
                                     "--no-progress"])
        assert r.exit_code == 1, r.output
        assert r.output.startswith(f"Error: run directory {out} is in use by `kdcache train --out run --seed 0` "
                                   f"(pid {os.getpid()}"), r.output
    assert not out.exists()  # nothing was written


def test_train_does_not_start_on_a_cache_a_build_is_writing(tmp_path, small_cache):
    with WriterLock(small_cache, what="cache", command="kdcache build --resume"):
        with pytest.raises(TrainError, match=r"being written by `kdcache build --resume`.*--allow-incomplete"):
            train(_cfg(small_cache, tmp_path / "a"))
        assert not (tmp_path / "a").exists()
        # told to, it trains on the units finished so far and is not stopped by the build
        assert train(_cfg(small_cache, tmp_path / "b", allow_incomplete=True)).steps == 6
    assert locks.holder_of(tmp_path / "b") is None


def test_resume_removes_a_checkpoint_cut_by_a_kill(tmp_path, small_cache, caplog):
    out = tmp_path / "run"
    train(_cfg(small_cache, out, max_steps=2))
    cut = out / "checkpoints" / ".step-00000004.tmp-99999"
    cut.mkdir()
    (cut / "student.safetensors").write_bytes(b"half")
    (out / ".config.json.tmp-99999").write_text("{")
    _write_lock(out, pid=_dead_pid(), command="kdcache train --out run (killed)")  # what the kill -9 left
    with caplog.at_level(logging.INFO):
        train(_cfg(small_cache, out, max_steps=2, resume=True))
    assert not cut.exists() and not (out / ".config.json.tmp-99999").exists()
    assert "took over the stale lock of `kdcache train --out run (killed)`" in caplog.text
    assert locks.holder_of(out) is None
    assert "removed checkpoints/.step-00000004.tmp-99999, left by a run killed while writing it" in caplog.text


def test_resume_of_a_run_killed_before_it_recorded_its_config(tmp_path, small_cache, caplog):
    """A kill between the trackers' start and config.json leaves only tensorboard/: --resume starts at step 0 and
    ends as an uninterrupted run; a folder holding anything else is not taken for a run."""
    reference = tmp_path / "reference"
    train(_cfg(small_cache, reference, max_steps=2))
    out = tmp_path / "run"
    (out / rundir.TENSORBOARD).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="kdcache.train.rundir"):
        assert train(_cfg(small_cache, out, max_steps=2, resume=True)).steps == 2
    assert "holds only the start of a run killed before it recorded its config" in caplog.text
    a, b = load_file(str(rundir.final_weights(out))), load_file(str(rundir.final_weights(reference)))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match=r"is not a kdcache run directory \(no config.json\)"):
        train(_cfg(small_cache, other, max_steps=2, resume=True))
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_run_whose_cache_is_extended_stops_and_resumes_on_the_same_data(
        tmp_path, teacher_spec, shards, classes_file, caplog, monkeypatch):
    """Build on 2 shards; train; a build takes the cache's lock mid-run (as `build --resume` does before extending
    it): the run stops after its next checkpoint. The build appends a third shard; `--resume` then finishes on the 2
    shards it started with, with the weights of an uninterrupted run."""
    cache = tmp_path / "c.zarr"
    assert build_cache(cache, teacher=teacher_spec, images=tuple(shards[:2]), classes=classes_file,
                       templates="photo", batch_size=4).ok
    reference = tmp_path / "reference"
    train(_cfg(cache, reference))

    out = tmp_path / "run"
    build_lock = WriterLock(cache, what="cache", command="kdcache build --resume (extending)")
    real_save = rundir.save_checkpoint

    def save_then_a_build_starts(run_dir, **kw):
        path = real_save(run_dir, **kw)
        if kw["step"] == 2:
            build_lock.acquire()
        return path

    monkeypatch.setattr(rundir, "save_checkpoint", save_then_a_build_starts)
    with pytest.raises(TrainError, match=r"stopped at step 2: the cache .* is being written by `kdcache build "
                                         r"--resume \(extending\)`.*rerun with --resume once the build"):
        train(_cfg(cache, out))
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    assert rundir.latest_checkpoint(out).name == "step-00000002" and not (out / "done.json").exists()
    with pytest.raises(TrainError, match="being written by"):  # not while the build runs
        train(_cfg(cache, out, resume=True))
    build_lock.release()

    assert build_cache(cache, teacher=teacher_spec, images=tuple(shards[:3]), classes=classes_file,
                       templates="photo", batch_size=4, resume=True).ok
    assert len(zarr.open_group(str(cache), mode="r").attrs[schema.ROOT_ATTR]["inputs"]["images"]) == 3
    with caplog.at_level(logging.INFO, logger="kdcache.train.cachepin"):
        res = train(_cfg(cache, out, resume=True))
    assert res.steps == 6
    assert "the cache gained 1 unit(s) since this run started" in caplog.text
    a, b = load_file(str(out / "final" / "student.safetensors")), load_file(str(reference / "final" /
                                                                                 "student.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
    # a new run uses the whole extended cache
    conf = json.loads((out / "config.json").read_text())
    assert len(conf["cache_pin"]["units"]) == 2


def test_a_rebuilt_unit_under_a_pinned_run_is_refused_naming_it(tmp_path, teacher_spec, shards, classes_file):
    cache = tmp_path / "c.zarr"
    assert build_cache(cache, teacher=teacher_spec, images=tuple(shards[:2])).ok
    out = tmp_path / "run"
    train(_cfg(cache, out, max_steps=2, losses=(("cosine", 1.0),)))
    g = zarr.open_group(str(cache), mode="r+")[f"{schema.STATUS}/images-00001"]
    g.attrs["valid"] = int(g.attrs["valid"]) - 1  # as if the unit had been written again differently
    with pytest.raises(CacheError, match=r"unit images-00001 changed since this run started"):
        train(_cfg(cache, out, max_steps=4, resume=True, losses=(("cosine", 1.0),)))


def test_a_root_left_by_a_kill_in_the_first_milliseconds_resumes(tmp_path, teacher_spec, shards, small_cache,
                                                                 classes_file, caplog):
    for broken in ("empty attributes", "cut zarr.json", "vocab half written"):
        out = tmp_path / broken.replace(" ", "_")
        root = zarr.open_group(str(out), mode="w")
        if broken == "cut zarr.json":
            (out / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
        if broken == "vocab half written":
            root.create_group(schema.VOCAB).create_array("classes", shape=(3,), dtype="float32")
        _write_lock(out, pid=_dead_pid())  # the killed build's lock, left behind
        with caplog.at_level(logging.WARNING):
            r = CliRunner().invoke(cli, _build_args(out, teacher_spec, shards[:2], classes_file, "--resume"))
        assert r.exit_code == 0, (broken, r.output)
        assert "holds only the start of a build killed" in caplog.text and "took over the stale lock" in caplog.text
        assert_identical_caches(out, small_cache)
        assert locks.holder_of(out) is None
        caplog.clear()
    # --overwrite recognises one too; a folder holding anything else is never taken for one
    out = tmp_path / "over.zarr"
    zarr.open_group(str(out), mode="w")
    r = CliRunner().invoke(cli, _build_args(out, teacher_spec, shards[:1], classes_file, "--overwrite"))
    assert r.exit_code == 0, r.output
    other = tmp_path / "other"
    zarr.open_group(str(other), mode="w")
    (other / "notes.txt").write_text("mine")
    r = CliRunner().invoke(cli, _build_args(other, teacher_spec, shards[:1], classes_file, "--resume"))
    assert r.exit_code == 1 and "not a kdcache cache" in r.output and (other / "notes.txt").exists(), r.output


def test_disk_full_is_one_line_and_the_build_resumes(tmp_path, teacher_spec, shards, classes_file, small_cache,
                                                    monkeypatch):
    import errno

    import zarr.storage._local as local_store

    out = tmp_path / "full.zarr"
    real_put = local_store._put
    seen = []

    def full_disk(path, value, exclusive=False):
        if "images/00001/" in str(path):
            seen.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local_store, "_put", full_disk)
    r = CliRunner().invoke(cli, _build_args(out, teacher_spec, shards[:2], classes_file))
    assert seen and r.exit_code == 1, r.output
    line = r.output.strip()
    assert line.startswith("Error: ") and "No space left on device" in line and "--resume" in line, line
    assert "images/00001/" in line and "\n" not in line and "Traceback" not in line
    assert locks.holder_of(out) is None
    monkeypatch.setattr(local_store, "_put", real_put)
    r = CliRunner().invoke(cli, _build_args(out, teacher_spec, shards[:2], classes_file, "--resume"))
    assert r.exit_code == 0, r.output
    assert_identical_caches(out, small_cache)


def test_disk_full_while_training_is_one_line_and_the_run_resumes(tmp_path, small_cache, monkeypatch):
    import errno

    out = tmp_path / "run"
    real_save = rundir.save_checkpoint

    def full_disk(run_dir, **kw):
        if kw["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "checkpoints" / "x"))
        return real_save(run_dir, **kw)

    monkeypatch.setattr(rundir, "save_checkpoint", full_disk)
    args = ["train", "--cache", str(small_cache), "--tower", "image", "--student", "kdc-tiny-image", "--out",
            str(out), "--max-steps", "6", "--batch-size", "4", "--checkpoint-every", "2", "--threads", "1",
            "--no-progress"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    err = [x for x in r.output.splitlines() if x.startswith("Error: ")]
    assert err and "No space left on device" in err[0] and "--resume" in err[0], r.output
    assert "Traceback" not in r.output and locks.holder_of(out) is None
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    r = CliRunner().invoke(cli, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert (out / "done.json").exists()
