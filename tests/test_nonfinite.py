"""Training never ends "successfully" on NaN: every float option is refused when non-finite or out of range (CLI and
TrainConfig), a non-finite loss stops the run naming the step and the term, the last good checkpoint survives and
--resume continues from it, and the fp16 GradScaler's skipped steps are counted up to --max-skipped-steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_cache
from safetensors.torch import load_file

from kdcache.cli.main import cli
from kdcache.train import losses
from kdcache.train.config import TrainConfig, TrainError
from kdcache.train.finite import NonFiniteError, StepGuard, check_finite_weights
from kdcache.train.loop import run


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_spec):
    from kdcache.synth import write_image_shards

    d = tmp_path_factory.mktemp("nonfinite")
    shards = write_image_shards(d / "shards", n_shards=2, per_shard=40, seed=5, captions=False)
    out = d / "cache.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards)).ok
    return str(out)


def _cfg(cache, out, **kw) -> TrainConfig:
    base = {"tower": "image", "student": "kdc-tiny-image", "max_steps": 8, "batch_size": 8, "progress": False,
            "threads": 1, "checkpoint_every": 3, "losses": (("cosine", 1.0), ("l1", 0.5)), "val_fraction": 0.0}
    return TrainConfig(cache=cache, out=str(out), **{**base, **kw})


def _nan_cosine_at(monkeypatch, steps: set[int]) -> None:
    """The cosine term returns NaN (keeping the graph) on these training micro-batches (1-based; validation, under
    no_grad, is not counted)."""
    calls = {"n": 0}
    real = losses.CosineLoss.__call__

    def call(self, x):
        value = real(self, x)
        if not torch.is_grad_enabled():
            return value
        calls["n"] += 1
        return value * float("nan") if calls["n"] in steps else value
    monkeypatch.setattr(losses.CosineLoss, "__call__", call)


# ------------------------------------------------------------------------------------------------- bad float options

BAD_TRAIN_OPTIONS = [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-1e-3"),
    ("--weight-decay", "inf"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1"),
    ("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--grad-clip", "-1"),
    ("--temperature", "inf"), ("--temperature", "nan"), ("--temperature", "0"), ("--temperature", "-inf"),
    ("--val-fraction", "nan"), ("--val-fraction", "0.6"), ("--val-fraction", "-0.1"),
    ("--loss", "l1=nan"), ("--loss", "l1=inf"), ("--loss", "l1=-1"),
    ("--max-skipped-steps", "-1"),
]


@pytest.mark.parametrize(("option", "value"), BAD_TRAIN_OPTIONS)
def test_cli_train_refuses_each_bad_float_option(tmp_path, option, value):
    args = ["train", "--cache", str(tmp_path), "--tower", "image", "--student", "kdc-tiny-image",
            "--out", str(tmp_path / "run"), option, value]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert option in res.output and "Traceback" not in res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and (value in last or "range" in last or "finite" in last), last
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("policy", ["rrc=nan-1", "rrc=0.5-inf", "erase=nan", "erase=inf", "mix=mixup:inf",
                                    "mix=mixup:1,mixprob=nan"])
def test_cli_build_refuses_non_finite_augment_numbers(tmp_path, teacher_spec, shards, policy):
    res = CliRunner().invoke(cli, ["build", "--images", shards[0], "--teacher", teacher_spec, "--views", "2",
                                   "--augment", policy, "--out", str(tmp_path / "c.zarr"), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "Error: --augment" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # refused before the cache (or its lock) was left behind


@pytest.mark.parametrize(("field", "value"), [
    ("lr", float("nan")), ("lr", 0.0), ("weight_decay", float("inf")), ("weight_decay", -1.0),
    ("grad_clip", float("nan")), ("grad_clip", -0.5), ("temperature", float("inf")), ("temperature", 0.0),
    ("val_fraction", float("nan")), ("val_fraction", 0.9), ("max_skipped_steps", -1), ("batch_size", 0),
    ("lr", "1e-3"), ("losses", (("l1", float("nan")),)),
])
def test_train_config_refuses_what_the_cli_refuses(tmp_path, field, value):
    option = "--loss" if field == "losses" else "--" + field.replace("_", "-")
    with pytest.raises(TrainError, match=option):
        TrainConfig(cache="c", tower="image", student="kdc-tiny-image", out=str(tmp_path), **{field: value})


def test_train_config_keeps_valid_edges(tmp_path):
    cfg = TrainConfig(cache="c", tower="image", student="s", out=str(tmp_path), grad_clip=0.0, weight_decay=0.0,
                      val_fraction=0.0, max_skipped_steps=0, epochs=None, warmup_steps=0)
    assert cfg.grad_clip == 0.0 and cfg.max_skipped_steps == 0


# ------------------------------------------------------------------------------------------------------ the loop

def test_nan_loss_stops_naming_step_and_term_and_resume_continues(cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_cosine_at(monkeypatch, {5})
    args = ["train", "--cache", cache, "--tower", "image", "--student", "kdc-tiny-image", "--out", str(out),
            "--max-steps", "8", "--batch-size", "8", "--checkpoint-every", "3", "--threads", "1", "--no-progress",
            "--loss", "cosine=1", "--loss", "l1=0.5", "--val-fraction", "0"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, (res.output, res.exception)
    err = res.stderr.strip().splitlines()[-1]  # stdout (the run's banner) and stderr interleave in res.output
    assert err.startswith("Error: training stopped at step 5: non-finite loss term(s) cosine_loss=nan"), err
    assert "l1_loss" not in err and "Traceback" not in res.output
    # nothing claims done; the last good checkpoint (step 3) is intact and finite
    assert not (out / "done.json").exists() and not (out / "final").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    weights = load_file(str(out / "checkpoints" / "step-00000003" / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the NaN step is not logged as a step taken

    monkeypatch.undo()  # the cause is gone: --resume continues from step 3 and ends as an uninterrupted run would
    res = run(_cfg(cache, out, resume=True))
    assert res.steps == 8 and (out / "done.json").exists()
    ref = tmp_path / "ref"
    run(_cfg(cache, ref))
    a, b = (load_file(str(d / "final" / "student.safetensors")) for d in (out, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_validation_stops_before_its_checkpoint(cache, tmp_path, monkeypatch):
    """Finite weights, but the validation pass gives NaN (its rows, an fp16 overflow): the run stops there, the val
    row is logged, no checkpoint follows it and nothing claims done."""
    real = losses.CosineLoss.__call__
    monkeypatch.setattr(losses.CosineLoss, "__call__",
                        lambda self, x: real(self, x) * (1.0 if torch.is_grad_enabled() else float("nan")))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"^training stopped at step 3: validation gave non-finite "
                                             r"val_cosine_loss=nan, val_loss=nan \(the weights are finite\)"):
        run(_cfg(cache, out, max_steps=3, checkpoint_every=2, val_fraction=0.2))
    assert not (out / "done.json").exists() and not (out / "final").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    rows = [_strict(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train"] * 3 + ["val"]
    assert rows[-1]["val_loss"] is None and rows[-1]["non_finite"] == {"val_cosine_loss": "nan", "val_loss": "nan"}
    assert math.isfinite(rows[-1]["val_cosine"])  # the finite metrics of that pass are kept as they were


def _strict(line: str) -> dict:
    """A metrics.jsonl row parsed as strict JSON (no NaN/Infinity tokens, which jq and JavaScript refuse)."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token} in {line}")
    return json.loads(line, parse_constant=refuse)


def test_divergence_from_a_huge_lr_stops_non_zero_without_saving_nan(cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"training stopped at step \d+: "):
        run(_cfg(cache, out, lr=1e30, warmup_steps=0, checkpoint_every=1, max_steps=20))
    assert not (out / "done.json").exists() and not (out / "final").exists()
    for ck in (out / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(v).all() for v in load_file(str(ck / "student.safetensors")).values()), ck


def test_grad_clip_zero_turns_clipping_off(cache, tmp_path):
    """--grad-clip 0 is 'off' (not 'clip every gradient to zero'): the same run as an unreachable clip."""
    a = run(_cfg(cache, tmp_path / "a", max_steps=3, grad_clip=0.0, lr=1e-2))
    b = run(_cfg(cache, tmp_path / "b", max_steps=3, grad_clip=1e12, lr=1e-2))
    wa, wb = (load_file(str(Path(r.out) / "final" / "student.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows if r["kind"] == "train")


class FakeScaler:
    """GradScaler's interface on CPU, 'enabled', with unit scale: the loop must count its skipped steps itself."""

    steps = 0

    def __init__(self, *args, **kw) -> None:
        pass

    def is_enabled(self) -> bool:
        return True

    def scale(self, x):
        return x

    def unscale_(self, optimizer) -> None:
        pass

    def step(self, optimizer) -> None:
        FakeScaler.steps += 1
        optimizer.step()

    def update(self) -> None:
        pass


def test_fp16_scaler_skips_up_to_max_skipped_steps(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", FakeScaler)
    FakeScaler.steps = 0
    _nan_cosine_at(monkeypatch, {3, 4})
    res = run(_cfg(cache, tmp_path / "ok", max_skipped_steps=2))
    assert res.steps == 8 and FakeScaler.steps == 6  # two steps skipped, never applied
    final = load_file(str(tmp_path / "ok" / "final" / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())
    assert _skipped_steps(tmp_path / "ok") == [3, 4]  # metrics say which steps were not applied
    rows = {r["step"]: r for r in map(_strict, (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}
    assert rows[3]["cosine_loss"] is None and rows[3]["non_finite"]["cosine_loss"] == "nan"
    assert "non_finite" not in rows[2] and math.isfinite(rows[2]["loss"])


def _skipped_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train" and r.get("skipped")]


def test_real_grad_scaler_skip_leaves_the_weights_untouched(cache, tmp_path, monkeypatch):
    """torch's own GradScaler (on CPU, as the loop builds it for fp16 on CUDA): a NaN step is not applied (the weights
    are those of the step before), the scaler halves its scale and keeps going, and the run ends finite."""
    real = torch.amp.GradScaler
    made = []

    def scaler(*args, **kw):
        made.append(real("cpu", init_scale=2.0 ** 8))
        return made[-1]
    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    _nan_cosine_at(monkeypatch, {3})
    res = run(_cfg(cache, tmp_path / "a", max_steps=3, checkpoint_every=2, max_skipped_steps=1))
    assert res.steps == 3 and _skipped_steps(tmp_path / "a") == [3]
    assert made[0].get_scale() == 2.0 ** 7  # the scaler saw the non-finite gradients too
    a = load_file(str(tmp_path / "a" / "final" / "student.safetensors"))
    b = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000002" / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 3 changed nothing


def test_fp16_scaler_stops_after_too_many_consecutive_skips(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", FakeScaler)
    _nan_cosine_at(monkeypatch, {2, 4, 5, 6})  # 2 alone resets the count; 4, 5, 6 are three in a row
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"at step 6: 3 consecutive steps skipped .* --max-skipped-steps 2 "
                                             r"\(last: non-finite loss term\(s\) cosine_loss=nan\)"):
        run(_cfg(cache, out, max_skipped_steps=2))
    assert not (out / "done.json").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000003"


# ------------------------------------------------------------------------------------------------ the pieces

def test_step_guard_names_terms_and_the_total_only_when_alone():
    g = StepGuard(scaler_enabled=False, max_skipped=5)
    g.micro({"l1_loss": torch.tensor(1.0), "loss": torch.tensor(1.0)})
    assert g.step_ok(step=1, grad_norm=0.5)
    g.micro({"l1_loss": torch.tensor(1e38), "loss": torch.tensor(math.inf)})  # a finite term, an overflowing total
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss term\(s\) loss=inf;"):
        g.step_ok(step=2, grad_norm=0.5)
    g.micro({"l1_loss": torch.tensor(1.0), "loss": torch.tensor(1.0)})
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite gradient norm nan"):
        g.step_ok(step=3, grad_norm=math.nan)
    # accumulation: a bad first micro-batch is not hidden by a good last one
    g.micro({"ce_loss": torch.tensor(math.nan), "loss": torch.tensor(math.nan)})
    g.micro({"ce_loss": torch.tensor(1.0), "loss": torch.tensor(1.0)})
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite loss term\(s\) ce_loss=nan;"):
        g.step_ok(step=4, grad_norm=1.0)


def test_step_guard_counts_consecutive_scaler_skips():
    g = StepGuard(scaler_enabled=True, max_skipped=1)
    assert not g.step_ok(step=1, grad_norm=math.inf)
    assert g.step_ok(step=2, grad_norm=1.0) and g.skipped == 0
    assert not g.step_ok(step=3, grad_norm=math.inf)
    with pytest.raises(NonFiniteError, match="at step 4: 2 consecutive"):
        g.step_ok(step=4, grad_norm=math.nan)
    assert g.total_skipped == 3


def test_check_finite_weights_names_the_tensor():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_finite_weights(m, step=1, what="x")
    with torch.no_grad():
        m[1].bias[0] = math.inf
    with pytest.raises(NonFiniteError, match=r"step 7: weight '1.bias' is non-finite, so checkpoint step 7 was not"):
        check_finite_weights(m, step=7, what="checkpoint step 7")
