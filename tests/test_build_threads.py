"""Which threads a CPU build runs its work on: the teacher's forward on the build's torch threads, the stream (decode,
views) on one, and unit writes between batches on the build's own thread (no writer thread beside the forward)."""

from __future__ import annotations

import threading

import pytest
import torch
import zarr
from conftest import build_cache

from kdcache.cache import schema
from kdcache.cache import writer as writer_mod
from kdcache.cache.stream import ShardStream, one_thread
from kdcache.cache.writer import UnitWriter


@pytest.fixture
def torch_threads():
    """The test may change torch's thread count (a build sets it); put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_one_thread_produces_each_item_on_one_thread_and_restores(torch_threads):
    torch.set_num_threads(2)
    seen = []

    def items():
        for i in range(3):
            seen.append(torch.get_num_threads())
            yield i

    got = []
    for x in one_thread(items()):
        got.append((x, torch.get_num_threads()))
    assert got == [(0, 2), (1, 2), (2, 2)]  # the consumer sees its own count
    assert seen == [1, 1, 1]
    assert torch.get_num_threads() == 2

    def broken():
        yield 0
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        list(one_thread(broken()))
    assert torch.get_num_threads() == 2


def _record_writes(monkeypatch) -> list[str]:
    names = []
    real = writer_mod.write_unit

    def write_unit(*a, **kw):
        names.append(threading.current_thread().name)
        return real(*a, **kw)
    monkeypatch.setattr(writer_mod, "write_unit", write_unit)
    return names


def test_cpu_build_threads(tmp_path, teacher_spec, shards, monkeypatch, torch_threads):
    """threads=2: every forward on 2 torch threads, every stream step on 1, every unit written on the main thread;
    the build's recorded `threads` is still 2."""
    from kdcache.cache import assemble

    forward, stream = [], []
    real_outputs, real_shard = assemble.TeacherPass.image_outputs, ShardStream.shard

    def image_outputs(self, pixels):
        forward.append(torch.get_num_threads())
        return real_outputs(self, pixels)

    def shard(self, unit, quota):
        for item in real_shard(self, unit, quota):
            stream.append(torch.get_num_threads())
            yield item
    monkeypatch.setattr(assemble.TeacherPass, "image_outputs", image_outputs)
    monkeypatch.setattr(ShardStream, "shard", shard)
    writes = _record_writes(monkeypatch)
    out = tmp_path / "c.zarr"
    build_cache(out, teacher=teacher_spec, images=tuple(shards), views=2, batch_size=8, threads=2)
    assert forward and set(forward) == {2}
    assert stream and set(stream) == {1}
    assert writes == ["MainThread"] * len(shards)
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)[schema.ROOT_ATTR]
    assert attrs["build"]["threads"] == 2 and attrs["status"] == schema.CACHE_COMPLETE


def test_background_writer_writes_on_its_thread(tmp_path, monkeypatch):
    """background=True (a GPU teacher) keeps the writer thread; background=False writes before submit returns."""
    from kdcache.cache.schema import IMAGES, Unit

    calls = []
    monkeypatch.setattr(writer_mod, "write_unit",
                        lambda root, unit, *a: calls.append((unit.name, threading.current_thread().name)))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    for background in (True, False):
        w = UnitWriter(root, background=background)
        w.submit(Unit(IMAGES, int(background), "x.tar"), {}, {}, {})
        if background:
            w.drain()
        else:
            assert calls[-1] == ("images-00000", "MainThread")  # written before submit returned
        w.close()
    assert calls[0][0] == "images-00001" and calls[0][1].startswith("kdcache-writer")


def test_teacher_outputs_reach_the_host_when_read_on_the_cpu():
    """The build reads a batch's outputs one batch late (`HostOutputs`); on the CPU they are host tensors at once."""
    from kdcache.cache.assemble import HostOutputs

    emb = torch.randn(4, 8)
    out = HostOutputs.start((emb, None, None, None), {"h": emb * 2})
    assert out.event is None
    got = out.get()
    assert torch.equal(got[0], emb) and got[1:4] == (None, None, None) and torch.equal(got[4]["h"], emb * 2)


@pytest.mark.gpu
def test_teacher_outputs_on_cuda_are_copied_without_waiting_and_arrive_when_read():
    from kdcache.cache.assemble import HostOutputs

    emb = torch.randn(256, 512, device="cuda")
    idx = torch.randint(0, 9, (256, 5), device="cuda", dtype=torch.int32)
    out = HostOutputs.start((emb, idx, None, None), {"h": emb * 2})
    assert out.event is not None and out.values[0].is_pinned()
    got = out.get()
    assert torch.equal(got[0], emb.cpu()) and torch.equal(got[1], idx.cpu())
    assert torch.equal(got[4]["h"], (emb * 2).cpu())
