"""`kdcache train --report-to`: TensorBoard and W&B receive the rows metrics.csv holds, a resume continues the same
logs without repeating steps, and bad or uninstalled trackers are refused before step 1."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_cache

from kdcache.cli.main import cli
from kdcache.train import tracking
from kdcache.train.config import TrainConfig, TrainError, identity
from kdcache.train.loop import run


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_spec, classes_file):
    from kdcache.synth import write_image_shards

    d = tmp_path_factory.mktemp("tracking")
    shards = write_image_shards(d / "shards", n_shards=2, per_shard=16, seed=5)
    out = d / "cache.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards), classes=classes_file, templates="photo").ok
    return str(out)


def _cfg(cache, out, **kw) -> TrainConfig:
    # 8 steps over epochs of 3: validation rows at steps 3, 6 and 8; checkpoints at 2, 3, 4, 6 (and epoch ends)
    base = {"tower": "image", "student": "kdc-tiny-image", "max_steps": 8, "batch_size": 8, "progress": False,
            "threads": 1, "checkpoint_every": 2, "val_fraction": 0.2, "losses": (("cosine", 1.0), ("kl", 0.5))}
    return TrainConfig(cache=cache, out=str(out), **{**base, **kw})


class Killed(Exception):
    """Stands in for a kill: raised after the tracker has logged the given step, past the latest checkpoint."""


def _run_killed_at(cache, out, step: int, monkeypatch, **kw) -> None:
    real = tracking.Trackers.log

    def log(self, row):
        real(self, row)
        if row["kind"] == "train" and row["step"] == step:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(tracking.Trackers, "log", log)
        with pytest.raises(Killed):
            run(_cfg(cache, out, **kw))


def _csv_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as tracker series: {tag: [(step, value), ...]} over every numeric cell but `step`."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for col, cell in row.items():
                if col not in ("kind", "step") and cell != "":
                    out.setdefault(tracking.tag(row["kind"], col), []).append((int(row["step"]), float(cell)))
    return out


def _tensorboard_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _assert_same_series(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert [s for s, _ in got[name]] == [s for s, _ in want[name]], name
        np.testing.assert_array_equal(np.float32([v for _, v in got[name]]), np.float32([v for _, v in want[name]]),
                                      err_msg=name)


def test_tensorboard_holds_every_metrics_csv_series(cache, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    run(_cfg(cache, out, report_to=("tensorboard",)))
    want = _csv_series(out)
    assert {"train/loss", "train/cosine_loss", "train/kl_loss", "train/lr", "train/grad_norm", "train/samples_per_s",
            "val/cosine", "val/top1_agreement", "val/loss", "val/kl_loss"} <= set(want)
    assert [s for s, _ in want["train/loss"]] == list(range(1, 9))
    assert [s for s, _ in want["val/cosine"]] == [3, 6, 8]
    _assert_same_series(_tensorboard_series(out), want)


def test_resumed_run_continues_the_tensorboard_log_without_repeating_steps(cache, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    out = tmp_path / "resumed"
    _run_killed_at(cache, out, 5, monkeypatch, report_to=("tensorboard",))  # latest checkpoint: step 4
    assert json.loads((out / "checkpoints" / "step-00000004" / "meta.json").read_text())["step"] == 4
    killed = _tensorboard_series(out)
    assert [s for s, _ in killed["train/loss"]] == [1, 2, 3, 4, 5]
    run(_cfg(cache, out, report_to=("tensorboard",), resume=True))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the same log, continued
    got, want = _tensorboard_series(out), _csv_series(out)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))  # step 5 once, from the resumed attempt
    assert [s for s, _ in got["val/cosine"]] == [3, 6, 8]
    # samples/s differs between the attempts: equal values show that the resumed step 5 replaced the killed one
    _assert_same_series(got, want)


def _wandb_records(path: Path) -> list[bytes]:
    """The protobuf records of a .wandb file: a 7-byte ':W&B' header, then LevelDB-log framing (32 KiB blocks; each
    chunk has a 4-byte CRC, a 2-byte little-endian length and a type: 1 full, 2 first, 3 middle, 4 last)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, parts, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(parts)
            parts = b""
    return records


def _wandb_history(path: Path) -> dict[int, dict[str, float]]:
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[int, dict[str, float]] = {}
    for raw in _wandb_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out.setdefault(int(items.pop("_step")), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
    return out


def test_wandb_offline_logs_into_the_run_directory_and_resumes_the_same_run(cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is the optional extra: pip install 'kdcache[wandb]'")
    home = tmp_path / "wandb-home"  # W&B's own config, cache and data directories: nothing outside tmp_path
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "wb"
    _run_killed_at(cache, out, 5, monkeypatch, report_to=("wandb",))
    args = ["train", "--cache", cache, "--tower", "image", "--student", "kdc-tiny-image", "--out", str(out),
            "--max-steps", "8", "--batch-size", "8", "--threads", "1", "--checkpoint-every", "2", "--val-fraction",
            "0.2", "--loss", "cosine=1", "--loss", "kl=0.5", "--no-progress", "--resume", "--report-to", "wandb"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert list(cwd.iterdir()) == []
    run_id = (out / "wandb" / "kdcache-run-id").read_text().strip()
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # the killed attempt and the resume: one W&B run
    history = {}
    for f in files:  # what `wandb sync` would send, in order: a step already sent is not sent again
        for step, values in _wandb_history(f).items():
            history.setdefault(step, values)
    want = _csv_series(out)
    for name in ("train/loss", "train/kl_loss", "train/lr", "train/grad_norm", "val/cosine", "val/top1_agreement"):
        got = [(s, history[s][name]) for s in sorted(history) if name in history[s]]
        assert [s for s, _ in got] == [s for s, _ in want[name]], name
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want[name]], rtol=1e-6, err_msg=name)


def test_report_to_values_and_refusals(cache, tmp_path, monkeypatch):
    assert tracking.parse_report_to("none") == () and tracking.parse_report_to(()) == ()
    assert tracking.parse_report_to("all") == ("tensorboard", "wandb")
    assert tracking.parse_report_to("wandb, TensorBoard") == ("tensorboard", "wandb")
    with pytest.raises(TrainError, match=r"unknown tracker 'mlflow'.*tensorboard, wandb, all, none"):
        tracking.parse_report_to("tensorboard,mlflow")
    with pytest.raises(TrainError, match="'none' cannot be combined"):
        tracking.parse_report_to("none,wandb")
    r = CliRunner().invoke(cli, ["train", "--cache", cache, "--tower", "image", "--student", "kdc-tiny-image",
                                 "--out", str(tmp_path / "c"), "--report-to", "tensorbord"])
    assert r.exit_code == 2 and "unknown tracker 'tensorbord'" in r.output and "tensorboard" in r.output
    # a tracker whose package is missing stops the run before anything is written, naming the install command
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrainError, match=r"pip install 'kdcache\[wandb\]'"):
        run(_cfg(cache, tmp_path / "w", report_to=("tensorboard", "wandb")))
    assert not (tmp_path / "w").exists()
    monkeypatch.undo()
    # a tracker that cannot start (W&B without a login) leaves nothing that would need --resume to run again

    class NoLogin:
        def __init__(self, run_dir, **kw):
            (run_dir / "wandb").mkdir()
            (run_dir / "wandb" / "debug.log").write_text("no API key\n")
            raise TrainError("--report-to wandb: W&B could not start")

    monkeypatch.setattr(tracking, "WandB", NoLogin)
    monkeypatch.setattr(tracking, "check_installed", lambda report_to: None)
    with pytest.raises(TrainError, match="could not start"):
        run(_cfg(cache, tmp_path / "n", report_to=("tensorboard", "wandb")))
    assert list((tmp_path / "n").iterdir()) == []
    # where the metrics also go does not change the weights: a --resume may change it
    assert identity(_cfg(cache, tmp_path / "x", report_to=("wandb",))) == identity(_cfg(cache, tmp_path / "x"))
