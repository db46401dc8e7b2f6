"""DDP training under torchrun: ranks take disjoint slices of one global order, in-batch-negative losses gather across
ranks with gradient (2 ranks x B == 1 process x 2B), only rank 0 writes the run, and --resume survives kill -9 of a
rank. CPU only (gloo), 1 thread per rank."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_cache
from safetensors.torch import load_file

from kdcache.train import ddp
from kdcache.train.config import TrainConfig, TrainError
from kdcache.train.loop import run
from kdcache.train.losses import LOSSES, LossInputs
from kdcache.train.order import worker_batches
from kdcache.train.rundir import check_resume
from kdcache.train.students import build_student

# ------------------------------------------------------------------------------------------------ fast, one process


def test_rank_slices_are_disjoint_and_make_the_one_process_batches():
    rows = list(range(23))
    one = list(worker_batches(rows, size=6, keep_last=False, start=1, worker=0, workers=1))
    for workers in (1, 2):
        per_rank = []
        for rank in (0, 1):
            got = [b for w in range(workers) for b in worker_batches(rows, size=3, keep_last=False, start=1, worker=w,
                                                                       workers=workers, rank=rank, ranks=2)]
            per_rank.append(sorted(got))  # workers' batches, in batch order (slices are increasing)
        assert [a + b for a, b in zip(*per_rank, strict=True)] == one  # rank 0's slice, then rank 1's
        assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))
    # validation keeps the last, short global batch: every row exactly once across ranks, an empty slice yields nothing
    val = [list(worker_batches(rows[:14], size=4, keep_last=True, start=0, worker=0, workers=1, rank=r, ranks=2))
           for r in (0, 1)]
    assert val == [[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7], [12, 13]]]
    val = [list(worker_batches(rows[:10], size=4, keep_last=True, start=0, worker=0, workers=1, rank=r, ranks=2))
           for r in (0, 1)]
    assert val == [[[0, 1, 2, 3], [8, 9]], [[4, 5, 6, 7]]]
    with pytest.raises(ValueError, match="rank 2"):
        next(worker_batches(rows, size=3, keep_last=False, start=0, worker=0, workers=1, rank=2, ranks=2))


@pytest.mark.parametrize("name", ["icl", "affinity"])
def test_in_batch_losses_over_gathered_rows_equal_the_whole_batch(name):
    """Each rank's term over the rows `gather` returns is the one-process term over the whole batch (a fake gather
    standing in for the other rank); row-wise fields are not gathered, and the student's rows keep their gradient."""
    g = torch.Generator().manual_seed(0)
    s, t, o = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1) for _ in range(3))
    o[5] = float("nan")  # a row without a pair
    has = torch.tensor([True, True, False, True, True, True, True, False])
    whole = LossInputs(student=s, teacher=t, other=o, has_other=has, logit_scale=10.0, temperature=2.0)
    want = LOSSES[name]()(whole)
    for lo, hi in ((0, 4), (4, 8)):
        part = s[lo:hi].clone().requires_grad_()
        local = {"student": part, "teacher": t[lo:hi], "other": o[lo:hi]}
        fulls = {"student": s, "teacher": t, "other": o}

        def gather(x, lo=lo, hi=hi, local=local, fulls=fulls):
            full = next((fulls[k] for k, v in local.items() if v is x), has.to(torch.uint8))
            return torch.cat([full[:lo], x, full[hi:]])

        got = LOSSES[name]()(LossInputs(**local, has_other=has[lo:hi], labels=torch.zeros(4, dtype=torch.long),
                                        logit_scale=10.0, temperature=2.0, gather=gather))
        torch.testing.assert_close(got, want)
        got.backward()
        assert part.grad is not None and part.grad.abs().sum() > 0


def test_without_torchrun_variables_training_is_one_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ranks = ddp.setup("cpu")
    assert (ranks.rank, ranks.world, ranks.main, ranks.initialised_here) == (0, 1, True, False)
    x = torch.ones(2, 3)
    assert ranks.gather(x) is x and ranks.device("cuda:1") == "cuda:1"
    assert ranks.mean({"loss": 2.0}, torch.device("cpu")) == {"loss": 2.0}


def test_a_bad_distributed_setup_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(TrainError, match="WORLD_SIZE=2.*launch with torchrun"):
        ddp.setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(TrainError, match="must be integers"):
        ddp.setup("cpu")
    two = ddp.Ranks(rank=1, world=2, local_rank=1, local_world=2)
    assert two.device("cuda") == "cuda:1" and two.device("cpu") == "cpu"
    with pytest.raises(TrainError, match="share one GPU.*--device cuda"):
        two.device("cuda:0")
    with pytest.raises(TrainError, match="not mps"):
        two.device("mps")


def test_a_batchnorm_student_under_ddp_is_warned_about(tmp_path, caplog):
    """BatchNorm normalises each rank's rows by their own statistics: 2 ranks of B are then not 1 process of 2B, and
    the run says so (once, on rank 0); a student without BatchNorm trains silently."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for rank, net, warned in ((0, torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), True),
                                  (1, torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), False),
                                  (0, torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), False)):
            caplog.clear()
            with caplog.at_level("WARNING", logger="kdcache.train.ddp"):
                model = ddp.Ranks(rank=rank, world=2).wrap(net, torch.device("cpu"))
            assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
            assert ("1 BatchNorm layer(s)" in caplog.text) is warned, (rank, net, caplog.text)
    finally:
        dist.destroy_process_group()


def test_resume_with_another_world_size_is_refused_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"cache_fingerprint": "f", "config": {"lr": 1, "world_size": 2}}))
    for now in ({"lr": 1}, {"lr": 1, "world_size": 4}):
        with pytest.raises(TrainError, match=r"trained on 2 rank\(s\) \(world_size\).*resume with 2"):
            check_resume(run_dir, resume=True, fingerprint="f", resolved=now)
    assert check_resume(run_dir, resume=True, fingerprint="f", resolved={"lr": 1, "world_size": 2})


def test_the_readme_ddp_command_uses_real_train_options():
    from kdcache.cli.main import cli

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("#### Several GPUs or processes (DDP under torchrun)", 1)[1].split("\n#### ", 1)[0]
    command = section.split("```bash", 1)[1].split("# several nodes", 1)[0].replace("\\\n", " ")
    assert command.split()[:5] == ["torchrun", "--nproc-per-node", "8", "-m", "kdcache.cli.main"]
    given = {w for w in command.split("train", 1)[1].split() if w.startswith("--")}
    known = {o for param in cli.commands["train"].params for o in param.opts}
    assert given >= {"--batch-size", "--precision", "--device"} and given <= known, given - known
    assert "--batch-size` is per rank" in section


# --------------------------------------------------------------------------------------- torchrun, 2 ranks on gloo


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_spec, classes_file):
    from kdcache.synth import write_captions, write_image_shards

    d = tmp_path_factory.mktemp("ddp")
    shards = write_image_shards(d / "shards", n_shards=2, per_shard=24, seed=5)
    caps = write_captions(d / "caps.jsonl", "jsonl", n=40, seed=5)
    out = d / "cache.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards), captions=(caps,), views=2,
                       classes=classes_file, templates="photo").ok
    return str(out)


STUDENTS = {"image": "kdc-tiny-image", "text": "kdc-tiny-text"}


def _args(cache, out, *, tower, losses, batch, steps, extra=()):
    return ["train", "--cache", cache, "--tower", tower, "--student", STUDENTS[tower], "--out", str(out), "--max-steps",
            str(steps), "--batch-size", str(batch), "--threads", "1", "--lr", "5e-3", "--no-progress",
            *(a for loss in losses for a in ("--loss", loss)), *extra]


def _torchrun(args, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kdcache.cli.main", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def _torchrun_ok(args) -> str:
    proc = _torchrun(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _final(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "final" / "student.safetensors"))


def _train_rows(run_dir, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize("tower,losses", [("image", ("cosine=1", "kl=0.5")),
                                          ("text", ("cosine=1", "icl=0.5", "affinity=0.5"))])
def test_two_ranks_of_b_rows_equal_one_process_of_2b(cache, tmp_path, tower, losses):
    one = run(TrainConfig(cache=cache, tower=tower, student=STUDENTS[tower], out=str(tmp_path / "one"), max_steps=8,
                          batch_size=8, threads=1, lr=5e-3, progress=False, val_fraction=0.25,
                          losses=tuple((n, float(w)) for n, w in (x.split("=") for x in losses))))
    out = _torchrun_ok(_args(cache, tmp_path / "two", tower=tower, losses=losses, batch=4, steps=8,
                             extra=("--workers", "1", "--val-fraction", "0.25")))
    assert "DDP: 2 ranks x --batch-size 4 = global batch 8" in out
    two = tmp_path / "two"
    # only rank 0 wrote the run: one config, one metrics row per step, its files and no temporaries of rank 1
    assert [r["step"] for r in _train_rows(two)] == list(range(1, 9))
    assert json.loads((two / "config.json").read_text())["config"]["world_size"] == 2
    assert json.loads((two / "done.json").read_text())["steps"] == one.steps == 8
    # same per-step losses (the logged loss is the mean over ranks of each rank's terms) ...
    for a, b in zip(_train_rows(tmp_path / "one"), _train_rows(two), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a, b)
    # validation: each rank scores its slices, sums are added across ranks; row-wise metrics are the one-process ones
    # (in-batch terms are not: validation batches are --batch-size rows, 4 here vs 8)
    row_wise = {"val_rows", "val_cosine", "val_top1_agreement", "val_cosine_loss", "val_kl_loss"}
    vals = _train_rows(tmp_path / "one", "val"), _train_rows(two, "val")
    assert len(vals[0]) == len(vals[1]) >= 1 and vals[0][0]["val_rows"] > 0
    for a, b in zip(*vals, strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for k in row_wise & a.keys():
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a, b)
    # ... and the same weights up to float rounding (CPU matmuls of 4 vs 8 rows round differently)
    a, b = _final(tmp_path / "one"), _final(two)
    embed_dim = json.loads((two / "config.json").read_text())["embed_dim"]
    init = build_student(STUDENTS[tower], tower=tower, teacher_dim=embed_dim, seed=0).state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in init if k in a) > 1e-2  # the student did move
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.in_proj_bias"):
            # Softmax attention is invariant to the key bias: its true gradient is 0, so AdamW turns rounding noise
            # into lr-sized steps of either sign. It changes no output; compare the query and value biases only.
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, rtol=0, atol=1e-3, msg=k)


def _pid_of_rank(torchrun_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a child of the torchrun process), from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0") if ppid == torchrun_pid else []
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _kill_args(cache, out, *extra):
    return _args(cache, out, tower="image", losses=("cosine=1", "kl=0.5"), batch=4, steps=20,
                 extra=("--checkpoint-every", "3", *extra))


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("ddp-ref") / "ref"
    _torchrun_ok(_kill_args(cache, ref))
    return ref


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("rank", [1, 0])  # 0: the writer, killed holding the run's lock, maybe mid-checkpoint
def test_resume_after_kill9_of_a_rank_ends_with_the_uninterrupted_weights(cache, uninterrupted, tmp_path, rank):
    args = functools.partial(_kill_args, cache)
    out = tmp_path / "killed"
    proc = _torchrun(args(out))
    latest, deadline = out / "checkpoints" / "latest", time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim = _pid_of_rank(proc.pid, rank)
    assert victim is not None, f"rank {rank} not found"
    os.kill(victim, signal.SIGKILL)
    try:  # the other rank, blocked in a collective with the dead one, must not hang: torchrun tears it down
        proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert latest.exists() and not (out / "done.json").exists(), "the kill landed outside the run"
    # another world size is refused, naming it, before anything is written
    with pytest.raises(TrainError, match="world_size"):
        run(TrainConfig(cache=cache, tower="image", student="kdc-tiny-image", out=str(out), max_steps=20,
                        batch_size=4, threads=1, lr=5e-3, progress=False, checkpoint_every=3,
                        losses=(("cosine", 1.0), ("kl", 0.5)), resume=True))
    _torchrun_ok(args(out, "--resume"))
    a, b = _final(uninterrupted), _final(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in _train_rows(out)] == list(range(1, 21))  # rows past the checkpoint replaced


def _guard_rank(rank: int, pg: str, out: str) -> None:
    """One rank of test_a_nan_on_one_rank_stops_every_rank_with_one_message: step 1 finite on both ranks; at step 2
    only rank 1's cosine term is NaN (a row only it holds), with a finite gradient norm on both ranks."""
    import torch.distributed as dist

    from kdcache.train.finite import NonFiniteError, StepGuard

    dist.init_process_group("gloo", init_method=f"file://{pg}", rank=rank, world_size=2)
    try:
        guard = StepGuard(scaler_enabled=False, max_skipped=0, reduce=ddp.Ranks(rank=rank, world=2).all_sum)
        seen = []
        for step in (1, 2):
            for _ in range(2):  # two micro-batches per step
                cos = torch.tensor(float("nan") if (rank, step) == (1, 2) else 0.5)
                guard.micro({"cosine_loss": cos, "l1_loss": torch.tensor(0.25), "loss": cos + 0.25})
            try:
                seen.append(guard.step_ok(step=step, grad_norm=1.0))
            except NonFiniteError as e:
                seen.append(str(e))
        Path(out).write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_a_nan_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    """The step guard sums each step's loss terms over the ranks: a NaN term on rank 1 only stops rank 0 too, at the
    same step, naming the same term (a rank stopping alone would leave the other waiting in its next collective)."""
    import torch.multiprocessing as mp

    mp.spawn(_run_guard_rank, args=(str(tmp_path),), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1]
    assert got[0][0] is True and got[0][1].startswith("training stopped at step 2: non-finite loss term(s) "
                                                      "cosine_loss=nan"), got[0]
    assert "l1_loss" not in got[0][1]


def _run_guard_rank(rank: int, tmp: str) -> None:
    _guard_rank(rank, f"{tmp}/pg", f"{tmp}/rank{rank}.json")
