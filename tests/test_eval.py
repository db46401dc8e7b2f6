"""kdcache eval and compare: teacher, export and run side by side on tiny shards; reports, tables, plots, errors."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import CLASSES, build_cache

from kdcache.cli.eval_cmds import compare_cmd, eval_cmd
from kdcache.eval.compare import DAGGER, CompareError, compare
from kdcache.eval.models import ModelError, resolve_model
from kdcache.eval.report import short_names
from kdcache.eval.run import EvalConfig, EvalError, run

# Latency is measured but never asserted beyond "a positive number": keep it cheap.
FAST = {"progress": False, "latency_batch": 4, "latency_repeats": 2, "latency_warmup": 1, "threads": 1}


@pytest.fixture(scope="module")
def work(tmp_path_factory, teacher_spec, shards, classes_file):
    """A cache of the fixture shards, a 5-step image run on it, and its export with the teacher's text tower."""
    from kdcache.export import export
    from kdcache.train.config import TrainConfig
    from kdcache.train.loop import run as train

    d = tmp_path_factory.mktemp("eval")
    cache = d / "cache.zarr"
    assert build_cache(cache, teacher=teacher_spec, images=tuple(shards), classes=classes_file, templates="photo").ok
    train(TrainConfig(cache=str(cache), tower="image", student="kdc-tiny-image", out=str(d / "run"), max_steps=5,
                      batch_size=8, progress=False, threads=1))
    export(out=str(d / "exported"), image_run=str(d / "run"), text_from_teacher=teacher_spec)
    return {"dir": d, "cache": str(cache), "run": str(d / "run"), "exported": str(d / "exported"),
            "teacher": teacher_spec, "shards": tuple(shards), "classes": classes_file}


def assert_png(path: Path) -> None:
    """A real picture: PNG signature, a width and height a reader can see, and more than a blank canvas."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    w, h = struct.unpack(">II", data[16:24])
    assert 300 <= w <= 4000 and 250 <= h <= 4000, f"{path}: {w}x{h}"
    with Image.open(path) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, f"{path} is (nearly) blank"


def _zeroshot(work, out, models, **kw) -> dict:
    cfg = {"data": work["shards"], "task": "zeroshot", "classes": work["classes"], "templates": "photo", **FAST, **kw}
    return run(EvalConfig(models=tuple(models), out=str(out), **cfg))


@pytest.fixture(scope="module")
def three(work):
    """Teacher, export and run evaluated together."""
    out = work["dir"] / "report-three"
    return out, _zeroshot(work, out, [work["teacher"], work["exported"], work["run"]])


def test_report_files_and_keys(three, work):
    out, rep = three
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["task"] == "zeroshot"
    assert {"kdcache_version", "created", "task", "config", "data", "teacher", "agreement", "timing", "notes",
            "models", "classes", "templates"} <= set(on_disk)
    assert on_disk["data"]["samples"] == 30 and on_disk["data"]["shards"] == 3
    assert [m["kind"] for m in on_disk["models"]] == ["open_clip", "export", "run"]  # teacher first
    assert [m["is_teacher"] for m in on_disk["models"]] == [True, False, False]
    for m in on_disk["models"]:
        assert {"top1", "top5", "macro_precision", "macro_recall", "macro_f1", "weighted_f1", "per_class",
                "confusion"} <= set(m["metrics"])
        assert m["metrics"]["top5"] is None  # 3 classes: top-5 would be trivially 100%
        assert sum(m["metrics"]["per_class"]["support"]) == 30
        assert (out / m["metrics"]["confusion_csv"]).is_file()
        assert m["latency"]["ms_per_image_b1"] > 0 and m["latency"]["images_per_s"] > 0
    md = (out / "report.md").read_text()
    for section in ("## Accuracy", "## Agreement with the teacher", "## Efficiency", "## Per class",
                    "## Confusion matrices", "| model | top-1 | top-5 | macro P | macro R | macro F1 | weighted F1 |"):
        assert section in md
    assert on_disk["timing"]["side_by_side"] is True


def test_zeroshot_writes_confusion_and_per_class_pngs_linked_from_the_report(three):
    out, rep = three
    md = (out / "report.md").read_text()
    for i, m in enumerate(rep["models"]):
        plots = m["metrics"]["plots"]
        assert set(plots) == {"confusion", "per_class"}
        assert plots["confusion"].startswith(f"confusion-{i}-") and plots["per_class"].startswith(f"per-class-{i}-")
        for name in plots.values():
            assert_png(out / name)
            assert f"]({name})" in md  # a Markdown image link, relative to report.md
    assert len(list(out.glob("*.png"))) == 2 * len(rep["models"])


def test_teacher_accuracy_equals_a_direct_computation(three, work):
    """The eval pipeline keeps rows and labels together: the teacher's numbers match a hand-rolled loop."""
    from kdcache.shards import ShardReport, iter_shard, parse_sample
    from kdcache.teacher import load_teacher
    from kdcache.views import eval_transform_uint8

    t = load_teacher(work["teacher"])
    tf = eval_transform_uint8(t.preprocess)
    pixels, labels = [], []
    for url in work["shards"]:
        for raw in iter_shard(url, ShardReport(url)):
            s = parse_sample(raw, max_pixels=10**8)
            pixels.append(tf(s.image))
            labels.append(s.label)
    pred = (t.encode_images(torch.stack(pixels)) @ t.zero_shot_head(CLASSES, ["a photo of a {}."]).T).argmax(1)
    labels = torch.tensor(labels)
    teacher = three[1]["models"][0]
    assert teacher["metrics"]["top1"] == pytest.approx((pred == labels).float().mean().item())
    assert teacher["metrics"]["per_class"]["support"] == torch.bincount(labels, minlength=3).tolist()
    cm = torch.tensor(teacher["metrics"]["confusion"])
    assert cm.sum(1).tolist() == teacher["metrics"]["per_class"]["support"]


def test_export_and_its_run_give_the_same_predictions(three):
    """The run (cache head) and its export (folded projection + the teacher's text tower) are one model."""
    _, rep = three
    exported, run_model = rep["models"][1], rep["models"][2]
    assert exported["metrics"]["top1"] == pytest.approx(run_model["metrics"]["top1"])
    assert exported["metrics"]["per_class"]["f1"] == pytest.approx(run_model["metrics"]["per_class"]["f1"])
    for k in ("top1_agreement", "cosine", "kl"):
        assert exported["agreement"][k] == pytest.approx(run_model["agreement"][k], abs=1e-4)
    assert rep["models"][0]["agreement"] is None
    assert 0 <= run_model["agreement"]["top1_agreement"] <= 1 and run_model["agreement"]["kl"] >= 0


def test_efficiency_facts(three, work):
    _, rep = three
    teacher, exported, run_model = rep["models"]
    assert run_model["size_mb"] == pytest.approx((Path(work["run"]) / "final/student.safetensors").stat().st_size / 1e6)
    assert exported["size_mb"] == pytest.approx(
        (Path(work["exported"]) / "open_clip_model.safetensors").stat().st_size / 1e6)
    assert run_model["image_params"] == exported["image_params"] < teacher["image_params"]


def test_agreement_from_the_cache_matches_the_teacher(three, work, tmp_path):
    """Without a teacher model, the cached teacher outputs of the same shards give the same agreement."""
    rep = _zeroshot(work, tmp_path / "r", [work["run"]], cache=work["cache"])
    assert rep["agreement"]["available"] and "cache" in rep["agreement"]["reference"]
    got, want = rep["models"][0]["agreement"], three[1]["models"][2]["agreement"]
    assert got["cosine"] == pytest.approx(want["cosine"], abs=2e-3)  # the cache stores fp16 embeddings
    assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=1 / 30 + 1e-9)
    assert got["kl"] == pytest.approx(want["kl"], abs=5e-3)


def test_cache_agreement_reuses_the_digests_of_the_data_pass(work, tmp_path, monkeypatch):
    """Shards read to their end were hashed while read: agreement must not read them a second time. A shard the pass
    stopped in (--limit) is hashed on its own."""
    from kdcache.eval import run as eval_run

    hashed = []
    real = eval_run.file_sha256
    monkeypatch.setattr(eval_run, "file_sha256", lambda url: hashed.append(url) or real(url))
    rep = _zeroshot(work, tmp_path / "r", [work["run"]], cache=work["cache"])
    assert rep["agreement"]["available"] and hashed == []
    rep = _zeroshot(work, tmp_path / "r2", [work["run"]], cache=work["cache"], limit=4)
    assert rep["agreement"]["available"] and len(hashed) == 1


def test_cache_agreement_refused_for_other_shards_with_the_same_keys(work, tmp_path):
    from kdcache.synth import write_image_shards

    other = write_image_shards(tmp_path / "other", n_shards=1, per_shard=10, classes=CLASSES, seed=9)
    rep = _zeroshot(work, tmp_path / "r", [work["run"]], cache=work["cache"], data=tuple(other))
    assert not rep["agreement"]["available"]
    assert "not one of cache" in rep["agreement"]["reason"]
    assert rep["models"][0]["agreement"] is None
    assert "Unavailable" in (tmp_path / "r" / "report.md").read_text()


def test_retrieval_of_teacher_and_export(work, tmp_path):
    rep = run(EvalConfig(models=(work["teacher"], f"local-dir:{work['exported']}"), data=work["shards"],
                         task="retrieval", out=str(tmp_path / "r"), limit=20, **FAST))
    assert rep["data"]["samples"] == 20
    for m in rep["models"]:
        assert {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= set(m["metrics"])
        assert m["metrics"]["i2t_r10"] >= m["metrics"]["i2t_r5"] >= m["metrics"]["i2t_r1"]
    # The export's text tower is the teacher's: identical caption embeddings.
    assert rep["models"][1]["agreement"]["text_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rep["retrieval"]["unique_captions"] < 20  # the synthetic captions repeat
    assert "I→T R@1" in (tmp_path / "r" / "report.md").read_text()


def test_export_accepted_with_and_without_prefix(work):
    for spec in (work["exported"], f"local-dir:{work['exported']}"):
        m = resolve_model(spec)
        assert m.kind == "export" and not m.is_teacher and m.can_embed_text
    assert resolve_model(work["teacher"]).kind == "open_clip"


def test_bad_models_fail_clearly(work, tmp_path):
    with pytest.raises(ModelError, match="no such file or directory"):
        resolve_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a training run"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unknown teacher 'ViT-Q-99'"):
        resolve_model("ViT-Q-99")
    with pytest.raises(ModelError, match="retrieval needs a text tower"):
        run(EvalConfig(models=(work["run"],), data=work["shards"], task="retrieval", out=str(tmp_path / "r"),
                       **FAST))


def test_run_classes_must_match_its_cache(work, tmp_path):
    reordered = tmp_path / "classes.txt"
    reordered.write_text("\n".join(reversed(CLASSES)) + "\n")
    with pytest.raises(ModelError, match="--classes do not match the class head of the run's cache"):
        _zeroshot(work, tmp_path / "r", [work["run"]], classes=str(reordered))
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_label_outside_the_vocabulary_is_an_error(work, tmp_path):
    two = tmp_path / "two.txt"
    two.write_text("red\ngreen\n")
    with pytest.raises(EvalError, match="outside the 2 classes"):
        _zeroshot(work, tmp_path / "r", [work["teacher"]], classes=str(two))


def test_cli_eval(work, tmp_path):
    r = CliRunner().invoke(eval_cmd, ["--model", work["exported"], "--data", *work["shards"][:1], "--task",
                                      "zeroshot", "--classes", work["classes"], "--templates", "photo", "--out",
                                      str(tmp_path / "r"), "--latency-repeats", "1", "--latency-batch", "2",
                                      "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "top-1" in r.output and "report.md" in r.output
    assert "plots: " in r.output and str(tmp_path / "r" / "confusion-0-") in r.output
    r = CliRunner().invoke(eval_cmd, ["--model", work["exported"], "--data", work["shards"][0], "--task", "zeroshot",
                                      "--out", str(tmp_path / "r2")])
    assert r.exit_code != 0 and "needs --classes" in r.output
    r = CliRunner().invoke(eval_cmd, ["--help"])
    assert r.exit_code == 0 and "--latency-batch" in r.output and "default: 32" in r.output


@pytest.fixture(scope="module")
def export_alone(work):
    """A second report: the export timed on its own, in another process-run than the teacher."""
    out = work["dir"] / "report-export"
    _zeroshot(work, out, [work["exported"]])
    return out


def _rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| model", "| ---"))]


def test_compare_merges_reports_teacher_first_with_ratios(three, export_alone, work, tmp_path):
    report_three = three[0]
    md = compare([str(export_alone), str(report_three)], out=None)
    rows = _rows(md)
    assert len(rows) == 3 and "(teacher)" in rows[0]  # one row per model, the teacher once and first
    teacher, exported, run_model = three[1]["models"]
    smaller = teacher["image_params"] / run_model["image_params"]
    assert f"{smaller:.1f}×" in rows[2]
    # The export shares a report with the teacher, so its home is that report: no dagger.
    assert DAGGER not in md


def test_compare_marks_ratios_from_separate_runs(work, export_alone, tmp_path):
    teacher_alone = tmp_path / "teacher"
    _zeroshot(work, teacher_alone, [work["teacher"]])
    md = compare([str(teacher_alone), str(export_alone)])
    rows = _rows(md)
    assert "(teacher)" in rows[0] and DAGGER in rows[1]
    assert "timed in separate runs" in md and "--remeasure" in md
    md = compare([str(teacher_alone), str(export_alone)], remeasure=True, latency_repeats=1, latency_batch=2)
    assert DAGGER not in _rows(md)[1] and "re-measured" in md


def test_compare_writes_markdown_and_plots(three, export_alone, tmp_path, capsys):
    out = tmp_path / "cmp" / "compare.md"
    md = compare([str(three[0]), str(export_alone)], out=str(out))
    assert out.read_text() == md
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    for png in (tmp_path / "cmp" / "compare-training.png", tmp_path / "cmp" / "compare-accuracy-latency.png"):
        assert_png(png)
        assert f"wrote {png}" in printed and f"({png.name})" in md
    assert "matplotlib" not in md


def test_compare_rows_have_short_names_and_the_full_specs_below(three, work):
    md = compare([str(three[0])])
    names = [row.split(" | ")[0].removeprefix("| ") for row in _rows(md)]
    assert names == [f"**{Path(work['teacher'].removeprefix('local-dir:')).name}** (teacher)", "exported", "run"]
    assert not any("/" in n for n in names)
    listed = md.split("Models:", 1)[1]
    for spec in (work["teacher"], work["exported"], work["run"]):
        assert f"`{spec}`" in listed


def test_short_names_tell_equal_names_apart():
    def m(spec, kind="export", pretrained=None):
        return {"spec": spec, "kind": kind, "reload": {"spec": spec, "pretrained": pretrained}}

    assert short_names([m("/w/a/exported"), m("/w/b/exported/"), m("/w/runs/image", "run")]) == \
        ["a/exported", "b/exported", "image"]
    assert short_names([m("ViT-B-32", "open_clip", "openai"), m("hf-hub:timm/ViT-B-16-SigLIP", "open_clip"),
                        m("local-dir:/t/kdc-cifar10-rn18", "open_clip"), m("/c/kdc-tiny-vit.json", "open_clip")]) == \
        ["ViT-B-32 (openai)", "ViT-B-16-SigLIP", "kdc-cifar10-rn18", "kdc-tiny-vit"]
    # The same directory with other weights in two reports (re-exported between them): the report tells them apart.
    assert short_names([m("/w/exported"), m("/w/exported")], contexts=["rep1", "rep2"]) == \
        ["exported [rep1]", "exported [rep2]"]
    assert short_names([m("/w/exported"), m("/w/exported")]) == ["exported #1", "exported #2"]
    assert short_names([m("/w/exported"), m("/w/exported"), m("/v/exported")], contexts=["r1", "r2", "r2"]) == \
        ["w/exported [r1]", "w/exported [r2]", "v/exported"]


def test_compare_marks_a_random_teacher_and_drops_the_deltas(work, three, tmp_path):
    """Against a random-init teacher a student "beats" it by tens of points: the table must not read as a result."""
    from kdcache.quickstart import tiny_teacher_path

    out = tmp_path / "random"
    rep = _zeroshot(work, out, [tiny_teacher_path(), work["exported"]], allow_random_init=True)
    assert rep["models"][0]["is_teacher"] and rep["models"][0]["provenance"]["identity"]["random_init"]
    md = compare([str(out)])
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    rows = _rows(md)
    assert "**kdc-tiny-vit** (teacher, RANDOM)" in rows[0]
    assert "Δ" not in header and all(r.count(" | ") == header.count(" | ") for r in rows)
    assert "RANDOM weights" in md and "no Δ against it" in md
    # A teacher with real weights keeps its Δ columns and is not called random.
    md = compare([str(three[0])])
    assert "Δ top-1" in md and "RANDOM" not in md


# open_clip logs "No pretrained weights loaded for model ... Model initialized randomly." on the root logger.
NO_WEIGHTS = ("initialized randomly", "no CLIP weights found")


def _no_weights_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if any(s in r.getMessage() for s in NO_WEIGHTS)]


def test_export_and_eval_of_an_export_say_nothing_about_random_weights(work, tmp_path, caplog):
    from kdcache.export import export
    from kdcache.modelcfg import load_config_file, open_clip_from_config
    from kdcache.quickstart import tiny_teacher_path

    caplog.set_level(logging.INFO)
    open_clip_from_config(load_config_file(tiny_teacher_path()))  # what export does, unfiltered: open_clip warns
    assert len(_no_weights_records(caplog)) == 2
    caplog.clear()
    export(out=str(tmp_path / "exp"), image_run=work["run"], text_from_teacher=work["teacher"])
    m = resolve_model(str(tmp_path / "exp"))
    assert m.kind == "export"
    assert _no_weights_records(caplog) == []
    assert any("Loading full pretrained weights" in r.getMessage() for r in caplog.records)  # open_clip was heard


def test_a_random_teacher_still_warns(caplog):
    from kdcache.quickstart import tiny_teacher_path
    from kdcache.teacher import load_teacher

    caplog.set_level(logging.WARNING)
    load_teacher(tiny_teacher_path(), allow_random_init=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(r.name == "kdcache.teacher" and "has RANDOM weights" in r.getMessage() for r in warnings)
    # open_clip's own notice would name the temporary local-dir a JSON config goes through: kdcache's names the spec.
    assert _no_weights_records(caplog) == []


def test_the_no_weights_filter_drops_only_its_own_model(caplog):
    """The filter is scoped to the block and to one model: the same warning about another model, and any other
    warning, still show, and nothing is dropped once the block ends."""
    from kdcache.teacher import quiet_no_weights_warning

    caplog.set_level(logging.WARNING)
    mine = "No pretrained weights loaded for model 'local-dir:/tmp/mine'. Model initialized randomly."
    other = "No pretrained weights loaded for model 'ViT-B-32'. Model initialized randomly."
    with quiet_no_weights_warning(lambda name: name == "local-dir:/tmp/mine"):
        logging.warning(mine)
        logging.warning("Local config loaded, but no CLIP weights found in /tmp/mine")
        logging.warning(other)
        logging.warning("something else went wrong")
        logging.getLogger("kdcache.x").warning(mine)  # not open_clip's (root) record: kept
    logging.warning(mine)
    assert [r.getMessage() for r in caplog.records] == [other, "something else went wrong", mine, mine]


def test_compare_cli_and_errors(three, tmp_path):
    r = CliRunner().invoke(compare_cmd, [str(three[0]), "--out", str(tmp_path / "c.md")])
    assert r.exit_code == 0, r.output
    assert "(teacher)" in r.output and f"wrote {tmp_path / 'c.md'}" in r.output
    (tmp_path / "notareport").mkdir()
    r = CliRunner().invoke(compare_cmd, [str(tmp_path / "notareport"), "--out", "-"])
    assert r.exit_code != 0 and "no report.json" in r.output


def test_compare_refuses_mixed_tasks(three, work, tmp_path):
    retrieval = tmp_path / "retr"
    run(EvalConfig(models=(work["exported"],), data=work["shards"][:1], task="retrieval", out=str(retrieval), **FAST))
    with pytest.raises(CompareError, match="different tasks"):
        compare([str(three[0]), str(retrieval)])


def test_pretrained_goes_to_the_one_model_it_applies_to(work, teacher_dir, tmp_path):
    """A JSON config + checkpoint is the same teacher as the local-dir it came from: it is picked as the teacher."""
    from kdcache.quickstart import tiny_teacher_path

    ckpt = str(teacher_dir / "open_clip_model.safetensors")
    rep = _zeroshot(work, tmp_path / "r", [work["exported"], tiny_teacher_path()], pretrained=ckpt,
                    cache=work["cache"], limit=8)
    teacher = rep["models"][0]
    assert teacher["is_teacher"] and teacher["spec"] == tiny_teacher_path()
    assert teacher["label"].endswith("(open_clip_model.safetensors)")
    assert rep["notes"] and "--cache is not used for agreement" in rep["notes"][0]
    with pytest.raises(EvalError, match="--pretrained .* applies to exactly one --model"):
        _zeroshot(work, tmp_path / "r2", [work["exported"]], pretrained=ckpt)


def test_random_init_teacher_needs_consent(work):
    from kdcache.quickstart import tiny_teacher_path

    with pytest.raises(ModelError, match="--allow-random-init"):
        resolve_model(tiny_teacher_path())
    m = resolve_model(tiny_teacher_path(), allow_random_init=True)
    assert m.weights_files == [] and "random init" in m.size_source and m.size_mb > 0


@pytest.mark.gpu
def test_eval_on_cuda_matches_cpu(three, work, tmp_path):
    """On CUDA (fp32), every model predicts what it predicts on the CPU; fp16 autocast runs and times too."""
    rep = _zeroshot(work, tmp_path / "r", [work["teacher"], work["exported"], work["run"]], device="cuda")
    for gpu, cpu in zip(rep["models"], three[1]["models"], strict=True):
        assert gpu["metrics"]["confusion"] == cpu["metrics"]["confusion"]
        assert gpu["latency"]["ms_per_image_b1"] > 0
    assert rep["timing"]["device"].startswith("cuda")
    half = _zeroshot(work, tmp_path / "h", [work["teacher"], work["run"]], device="cuda", precision="fp16")
    assert half["models"][1]["agreement"]["top1_agreement"] > 0.5


def test_compare_paired_ci_against_a_reference(three, work, tmp_path):
    from kdcache.eval.metrics import paired_difference

    report_dir, report = three
    md = compare([str(report_dir)], out=None, paired_ci=True)
    assert "## Paired differences against" in md
    teacher, exported, run_model = report["models"]
    labels = report["samples"]["labels"]
    correct = [[p == y for p, y in zip(m["metrics"]["predictions"], labels, strict=True)] for m in report["models"]]
    want = paired_difference(correct[1], correct[0])
    section = md.split("## Paired differences against")[1]
    assert f"{100 * want['diff']:.2f}" in section and f"{want['a_only']} / {want['b_only']}" in section
    names = [line.split(" | ")[0].strip("| ") for line in _rows(md)]
    md2 = compare([str(report_dir)], out=None, paired_ci=True, reference=names[-1])
    assert f"## Paired differences against {names[-1]}" in md2
    with pytest.raises(CompareError, match="--reference 'nope'"):
        compare([str(report_dir)], out=None, paired_ci=True, reference="nope")


def test_an_extreme_aspect_image_in_a_test_shard_is_one_reject(work, tmp_path):
    """A 3,000,000x1 PNG (a few KB, under max_pixels) would ask the eval resize for ~672M x 224 pixels: eval rejects
    it as the build does, counts it in the report and scores the rest."""
    import io

    from PIL import Image

    from kdcache.synth import write_tar

    def png(size):
        buf = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
        return buf.getvalue()

    shard = write_tar(tmp_path / "odd.tar", [
        ("a.png", png((64, 48))), ("a.cls", b"0"),
        ("wide.png", png((3_000_000, 1))), ("wide.cls", b"1"),
        ("b.png", png((40, 60))), ("b.cls", b"2"),
    ])
    run(EvalConfig(models=(work["teacher"],), out=str(tmp_path / "r"), data=(shard,), task="zeroshot",
                         classes=work["classes"], templates="photo", **FAST))
    data = json.loads((tmp_path / "r" / "report.json").read_text())["data"]
    assert data["rejected"] == {"extreme_aspect": 1} and data["samples"] == 2, data
