"""`ahead`: the --decode gpu build and students decode and render each batch on a background thread, one batch ahead of
the forward, in order, with errors raised at their own item and nothing left running after a stop."""

from __future__ import annotations

import threading

import pytest
from conftest import build_cache
from test_decode_gpu import mixed_shard  # noqa: F401 (a fixture)

from kdcache.shards.gpudecode import ahead

WAIT = 30  # seconds: only a broken pipeline waits this long


def test_items_come_in_order_with_their_work_done_on_another_thread():
    main = threading.get_ident()
    out = list(ahead(range(5), lambda i: (i * i, threading.get_ident())))
    assert [(i, sq) for i, (sq, _) in out] == [(i, i * i) for i in range(5)]
    assert all(t != main for _, (_, t) in out)


def test_the_next_items_work_runs_while_the_caller_holds_this_one():
    started = [threading.Event() for _ in range(3)]

    def work(i):
        started[i].set()
        return i

    for i, _ in ahead(range(3), work):
        if i + 1 < 3:  # the caller is still on item i: item i+1 is already being worked on
            assert started[i + 1].wait(WAIT)


def test_a_failing_work_raises_at_its_item_after_the_items_before_it():
    def work(i):
        if i == 2:
            raise ValueError("bad batch 2")
        return i

    got = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for _, w in ahead(range(5), work):
            got.append(w)
    assert got == [0, 1]


def test_a_failing_source_still_delivers_the_item_before_the_failure():
    def items():
        yield "shard finished"
        raise OSError("the next shard is unreadable")

    got = []
    with pytest.raises(OSError, match="unreadable"):
        for item, _ in ahead(items(), str.upper):
            got.append(item)
    assert got == ["shard finished"]


def test_stopping_early_runs_no_more_work_and_leaves_no_thread():
    calls = []

    def work(i):
        calls.append(i)
        return i

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    gen = ahead(endless(), work)
    assert next(gen) == (0, 0)
    gen.close()
    for t in threading.enumerate():
        if t.name.startswith("kdcache-decode"):
            t.join(WAIT)
    assert not [t for t in threading.enumerate() if t.name.startswith("kdcache-decode")]
    assert calls in ([0], [0, 1])  # item 0 and, at most, the one ahead of it


def test_a_gpu_decode_build_renders_on_the_decode_thread(tmp_path, mixed_shard, teacher_spec, monkeypatch):  # noqa: F811
    """The build's --decode gpu batches are decoded and rendered on the background thread, and the cache is the same
    as when they are rendered on the main thread."""
    import numpy as np
    import zarr

    import kdcache.cache.build as build_mod
    import kdcache.cache.gpuviews as gv

    shard, _ = mixed_shard
    common = dict(teacher=teacher_spec, images=(shard,), views=3, batch_size=4, embed_dtype="fp32", decode="gpu",
                  decode_device="cpu")
    threads = []
    real = gv.DeviceViews.pixels

    def pixels(self, batch):
        threads.append(threading.current_thread().name)
        return real(self, batch)
    monkeypatch.setattr(gv.DeviceViews, "pixels", pixels)
    assert build_cache(tmp_path / "ahead.zarr", **common).ok
    assert threads and all(t.startswith("kdcache-decode") for t in threads)

    monkeypatch.setattr(build_mod, "ahead", lambda items, work: ((item, work(item)) for item in items))
    assert build_cache(tmp_path / "inline.zarr", **common).ok
    assert threads[-1] == threading.current_thread().name
    a, b = (zarr.open_group(str(tmp_path / n), mode="r")["images/00000"] for n in ("ahead.zarr", "inline.zarr"))
    for k in ("emb", "valid", "view_box", "key"):
        assert np.array_equal(a[k][...], b[k][...]), k


def test_a_student_replays_each_batch_on_the_decode_thread():
    from kdcache.train.replay import replayed

    def replay(batch):
        return {**batch, "thread": threading.current_thread().name}
    out = list(replayed(iter([{"i": 0}, {"i": 1}, {"i": 2}]), replay))
    assert [b["i"] for b in out] == [0, 1, 2]
    assert all(b["thread"].startswith("kdcache-decode") for b in out)
    assert list(replayed(iter([{"i": 0}]), None)) == [{"i": 0}]  # no replay: the batches as they are


_BUILD = """
import sys
from kdcache.cache.build import run
from kdcache.cache.config import BuildConfig
try:
    run(BuildConfig(out=sys.argv[1], teacher=sys.argv[2], images=tuple(sys.argv[4:]), views=2,
                    batch_size=int(sys.argv[3]), threads=1, decode="gpu", decode_device="cpu", resume=True,
                    progress=False))
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.slow
def test_ctrl_c_with_the_decode_thread_running_then_resume_gives_the_identical_cache(tmp_path, teacher_spec):
    """A --decode gpu build interrupted while its decode thread works on the next batch exits promptly with what it
    finished written, and --resume completes the cache an uninterrupted build makes."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import assert_identical_caches

    from kdcache.cache import schema
    from kdcache.synth import write_image_shards

    shards = [str(s) for s in write_image_shards(tmp_path / "s", n_shards=8, per_shard=8, seed=4)]
    ref, out = tmp_path / "ref.zarr", tmp_path / "int.zarr"
    cmd = [sys.executable, "-c", _BUILD, "", teacher_spec, "2", *shards]
    assert build_cache(ref, teacher=teacher_spec, images=tuple(shards), views=2, batch_size=2, decode="gpu",
                       decode_device="cpu").ok  # the same build, uninterrupted, in this process

    def done() -> int:
        d = out / schema.STATUS
        return len(list(d.iterdir())) if d.exists() else 0
    proc = subprocess.Popen([*cmd[:3], str(out), *cmd[4:]], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while done() < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # a decode thread left waiting would hang the exit here
    assert proc.returncode == 130, err[-2000:]
    assert 0 < done() < len(shards), f"the interrupt landed outside the build ({done()} units done)"
    subprocess.run([*cmd[:3], str(out), *cmd[4:]], check=True, timeout=300)
    assert_identical_caches(out, ref)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_work_runs_on_a_stream_of_its_own_and_its_outputs_reach_the_callers():
    """nvjpeg writes its output without waiting for the caller's stream: the work must not share the caller's stream
    (whose freed blocks its kernels may still use), and the caller must wait for the work's kernels."""
    import torch

    torch.cuda.init()
    caller = torch.cuda.current_stream()

    def work(i):
        x = torch.full((2048, 2048), float(i), device="cuda")
        for _ in range(20):  # long enough that the caller would read it unfinished without the event
            x = x * 1.0 + 1.0
        return {"x": x, "stream": torch.cuda.current_stream()}

    for i, out in ahead(range(4), work):
        assert out["stream"] != caller
        assert float(out["x"][0, 0]) == i + 20 and float(out["x"].sum()) == (i + 20) * 2048 * 2048
