"""Subsets of one cache (`--include`, `--exclude`, `--labels`): the rule, training on a subset without rebuilding
(printed, recorded, part of the --resume identity) and eval on the matching subset of a test set."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CLASSES, build_cache

from kdcache.cli.eval_cmds import eval_cmd
from kdcache.cli.main import cli
from kdcache.eval.run import EvalConfig, EvalError
from kdcache.eval.run import run as evaluate
from kdcache.shards import ShardReport, iter_shard
from kdcache.subset import EVERYTHING, Subset, SubsetError, parse_labels
from kdcache.synth import write_tar
from kdcache.train.config import TrainConfig
from kdcache.train.data import TrainStream, count_rows
from kdcache.train.dataspec import DataError, DataSpec
from kdcache.train.loop import run as train
from kdcache.train.order import split_of

FAST = {"progress": False, "latency_batch": 2, "latency_repeats": 1, "latency_warmup": 0, "threads": 1,
        "batch_size": 64, "templates": "photo"}


@pytest.fixture(scope="module")
def data(tmp_path_factory, teacher_spec, shards, classes_file):
    """The session's 3 labelled, captioned shards (10 samples each) and a 20-record caption corpus, cached."""
    from kdcache.synth import write_captions

    d = tmp_path_factory.mktemp("subset")
    caps = write_captions(d / "corpus.jsonl", "jsonl", n=20, seed=5)
    cache = d / "cache.zarr"
    assert build_cache(cache, teacher=teacher_spec, images=tuple(shards), captions=(caps,), classes=classes_file,
                       templates="photo").ok
    samples = []  # (key, shard file name, label, position, url) of every sample, in shard order
    for url in shards:
        for raw in iter_shard(url, ShardReport(url)):
            samples.append((raw.key, Path(url).name, int(raw.members["cls"]), raw.position, url))
    return {"dir": d, "cache": str(cache), "shards": tuple(shards), "classes": classes_file, "samples": samples,
            "teacher": teacher_spec}


def _spec(data, subset: Subset = EVERYTHING, **kw) -> DataSpec:
    return DataSpec(cache=data["cache"], tower=kw.pop("tower", "image"), batch_size=4, subset=subset, **kw)


def _kept_keys(data, subset: Subset) -> dict[str, list[str]]:
    """The keys of the rows each split yields, from the training stream's own order."""
    spec = _spec(data, subset)
    stream = TrainStream(spec, split="train", epoch=0, student_preprocess={"size": 16})
    return {split: [r.key for r in stream.order(split, 0)] for split in ("train", "val")}


def _expected(data, keep) -> list[str]:
    return [k for k, name, label, _, _ in data["samples"] if keep(k, name, label)]


def _check(data, subset: Subset, keep) -> list[str]:
    got = _kept_keys(data, subset)
    want = _expected(data, keep)
    assert sorted(got["train"] + got["val"]) == sorted(want) and want
    assert sorted(got["val"]) == sorted(k for k in want if split_of(k, 0.05) == "val")  # the split is unchanged
    spec = _spec(data, subset)
    assert count_rows(spec, "train") == len(got["train"]) and count_rows(spec, "val") == len(got["val"])
    return want


# ------------------------------------------------------------------------------------------------------ the rule


def test_filter_by_key_glob(data):
    want = _check(data, Subset(include=("00001000[0-4]",)), lambda k, n, lab: k in {f"00001000{i}" for i in range(5)})
    assert len(want) == 5
    # a glob matches the whole key: a fragment matches nothing
    with pytest.raises(DataError, match="the filter --include '0001' keeps no image-tower rows"):
        _subset_rows(data, Subset(include=("0001",)))


def _subset_rows(data, subset):
    from kdcache.train.data import subset_rows

    return subset_rows(_spec(data, subset))


def test_filter_by_regex_is_a_search(data):
    _check(data, Subset(include=("re:[37]$",)), lambda k, n, lab: re.search("[37]$", k) is not None)
    _check(data, Subset(include=("re:^0000[02]",)), lambda k, n, lab: k.startswith(("00000", "00002")))


def test_filter_by_shard_name(data):
    want = _check(data, Subset(include=("shard-0000[02].tar",)), lambda k, n, lab: n in ("shard-00000.tar",
                                                                                          "shard-00002.tar"))
    assert len(want) == 20
    _check(data, Subset(include=("re:01\\.tar$", "00002000[0-2]")),
           lambda k, n, lab: n == "shard-00001.tar" or k in ("000020000", "000020001", "000020002"))


def test_exclude(data):
    _check(data, Subset(exclude=("shard-00000.tar", "re:5$")), lambda k, n, lab: n != "shard-00000.tar"
           and not k.endswith("5"))
    _check(data, Subset(include=("shard-00001.tar",), exclude=("00001000[0-3]",)),
           lambda k, n, lab: n == "shard-00001.tar" and k[-1] not in "0123")


def test_labels_by_id_and_by_name(data):
    by_name = Subset(labels=parse_labels(["red,blue"])).resolve(CLASSES)
    by_id = Subset(labels=parse_labels(["2", "0"])).resolve(CLASSES)
    assert by_name == by_id and by_name.label_ids == (0, 2)
    want = _check(data, by_name, lambda k, n, lab: lab in (0, 2))
    assert 0 < len(want) < 30
    _check(data, Subset(include=("shard-00001.tar",), labels=(1,)), lambda k, n, lab: n == "shard-00001.tar"
           and lab == 1)
    rows = list(TrainStream(_spec(data, by_name), split="train", epoch=0, student_preprocess={"size": 16}).order())
    assert {r.label for r in rows} == {0, 2}


def test_bad_filters_are_clear_errors():
    with pytest.raises(SubsetError, match=r"--include 're:\(': not a valid regular expression"):
        Subset(include=("re:(",))
    with pytest.raises(SubsetError, match="empty"):
        Subset(exclude=("",))
    with pytest.raises(SubsetError, match="'purple': not a class of the vocabulary"):
        Subset(labels=("purple",)).resolve(CLASSES)
    with pytest.raises(SubsetError, match="did you mean 'red'"):
        Subset(labels=("Red",)).resolve(CLASSES)
    with pytest.raises(SubsetError, match="no such class id"):
        Subset(labels=(3,)).resolve(CLASSES)
    with pytest.raises(SubsetError, match="give class ids"):
        Subset(labels=("red",)).resolve(None)
    with pytest.raises(SubsetError, match="empty class"):
        parse_labels(["red,,blue"])
    with pytest.raises(DataError, match="class ids"):
        DataSpec(cache="c", tower="image", batch_size=1, subset=Subset(labels=("red",)))


def test_row_order_is_a_function_of_seed_epoch_and_filter(data):
    subset = Subset(exclude=("re:[02]$",))
    spec = _spec(data, subset, seed=3, buffer=8)

    def keys(epoch):
        return [r.key for r in TrainStream(spec, split="train", epoch=epoch, student_preprocess={"size": 16}).order()]
    assert keys(0) == keys(0) and keys(1) == keys(1) and keys(0) != keys(1)
    assert sorted(keys(0)) == sorted(keys(1))


def test_an_excluded_shard_is_never_read(data, tmp_path):
    """Shards moved with --images: a shard the subset leaves out need not be readable at all."""
    moved = [str(shutil.copy(u, tmp_path / Path(u).name)) for u in data["shards"]]
    Path(moved[0]).write_bytes(b"")  # shard 0 is now unreadable
    spec = _spec(data, Subset(exclude=("shard-00000.tar",)), images=tuple(moved))
    stream = TrainStream(spec, split="train", epoch=0, student_preprocess={"size": 16})
    assert len(list(stream.order())) == count_rows(spec, "train") > 0
    with pytest.raises(DataError, match="shard 0"):
        list(TrainStream(_spec(data, images=tuple(moved)), split="train", epoch=0,
                         student_preprocess={"size": 16}).order())


# ---------------------------------------------------------------------------------------------------- text tower


def test_text_tower_keys_and_corpus_records(data):
    paired = count_rows(_spec(data, Subset(include=("shard-00001.tar",)), tower="text"), "train")
    paired += count_rows(_spec(data, Subset(include=("shard-00001.tar",)), tower="text"), "val")
    assert paired == 10  # the paired captions of that shard's images, no corpus record
    corpus = Subset(include=("corpus.jsonl",))
    n = sum(count_rows(_spec(data, corpus, tower="text"), s) for s in ("train", "val"))
    assert n == 20
    by_key = Subset(include=("cap:0:1*",))  # records 1 and 10..19 of corpus 0
    assert sum(count_rows(_spec(data, by_key, tower="text"), s) for s in ("train", "val")) == 11


def test_text_tower_refuses_labels_while_corpus_rows_are_read(data):
    with pytest.raises(DataError, match=r"--labels: the text tower reads caption corpora \['corpus.jsonl'\]"):
        count_rows(_spec(data, Subset(labels=(0,)), tower="text"), "train")
    spec = _spec(data, Subset(exclude=("corpus.jsonl",), labels=(0,)), tower="text")
    n = count_rows(spec, "train") + count_rows(spec, "val")
    assert n == sum(1 for _, _, lab, _, _ in data["samples"] if lab == 0)


def test_labels_refused_on_a_cache_without_labels(tmp_path, teacher_spec):
    from kdcache.synth import write_image_shards

    shards = write_image_shards(tmp_path / "s", n_shards=1, per_shard=4, labels=False, seed=2)
    build_cache(tmp_path / "c.zarr", teacher=teacher_spec, images=tuple(shards))
    with pytest.raises(DataError, match="has no labels"):
        count_rows(DataSpec(cache=str(tmp_path / "c.zarr"), tower="image", batch_size=1,
                            subset=Subset(labels=(0,))), "train")


# ----------------------------------------------------------------------------------------------------- training

RUN_FILTER = ["--include", "shard-0000[01].tar", "--include", "re:^00002", "--exclude", "re:9$", "--labels", "red",
              "--labels", "blue"]


def _train_args(data, out, *extra):
    return ["train", "--cache", data["cache"], "--tower", "image", "--student", "kdc-tiny-image", "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--threads", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def subset_run(data):
    out = data["dir"] / "run"
    r = CliRunner().invoke(cli, _train_args(data, out, *RUN_FILTER))
    assert r.exit_code == 0, r.output
    return out, r.output


def test_the_filter_and_its_rows_are_printed_and_recorded(data, subset_run):
    out, printed = subset_run
    keep = [k for k, n, lab, _, _ in data["samples"] if lab in (0, 2) and not k.endswith("9")]
    train_n = sum(split_of(k, 0.05) == "train" for k in keep)
    line = ("subset: --include 'shard-0000[01].tar' --include 're:^00002' --exclude 're:9$' --labels 0 (red),2 (blue) "
            f"keeps {train_n} training, {len(keep) - train_n} validation rows")
    assert line in printed
    assert printed.index("subset:") < printed.index("loss:")  # before step 1
    conf = json.loads((out / "config.json").read_text())
    filt = {"include": ["shard-0000[01].tar", "re:^00002"], "exclude": ["re:9$"], "labels": [0, 2]}
    assert conf["config"]["subset"] == filt  # the --resume identity: names resolved to ids
    assert conf["subset"] == {"filter": filt, "described": line.split(" keeps")[0].removeprefix("subset: "),
                              "rows": {"train": train_n, "val": len(keep) - train_n}}


def test_resume_identity_includes_the_filter(data, subset_run, tmp_path):
    out, _ = subset_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    # the same filter with ids instead of names is the same run
    same = [*RUN_FILTER[:-4], "--labels", "0,2"]
    r = CliRunner().invoke(cli, _train_args(data, copy, *same, "--resume"))
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, _train_args(data, copy, *RUN_FILTER[:-2], "--resume"))
    assert r.exit_code != 0 and "--resume refused: config changed (subset:" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, _train_args(data, copy, "--resume"))
    assert r.exit_code != 0 and "(subset:" in r.output and "-> None" in r.output


def test_a_filter_that_keeps_nothing_is_an_error_naming_it(data, tmp_path):
    r = CliRunner().invoke(cli, _train_args(data, tmp_path / "r", "--include", "shard-9*.tar"))
    assert r.exit_code != 0 and "the filter --include 'shard-9*.tar' keeps no image-tower rows" in r.output
    assert not (tmp_path / "r" / "config.json").exists()
    r = CliRunner().invoke(cli, _train_args(data, tmp_path / "r2", "--include", "re:(("))
    assert r.exit_code == 2 and "not a valid regular expression" in r.output and "Traceback" not in r.output
    with pytest.raises(SubsetError, match="'purple': not a class of the vocabulary of"):
        train(TrainConfig(cache=data["cache"], tower="image", student="kdc-tiny-image", out=str(tmp_path / "r3"),
                          max_steps=1, batch_size=4, progress=False, subset=Subset(labels=("purple",))))


def test_a_run_without_filter_keeps_its_identity(data):
    from kdcache.train.config import identity

    cfg = TrainConfig(cache=data["cache"], tower="image", student="s", out="o")
    assert "subset" not in identity(cfg)  # runs made before subsets still resume
    cfg = TrainConfig(cache=data["cache"], tower="image", student="s", out="o", subset=Subset(labels=("red",)))
    assert identity(cfg)["subset"] == {"include": [], "exclude": [], "labels": ["red"]}


# --------------------------------------------------------------------------------------------------------- eval


def _write_shards_of(samples, out_dir: Path, relabel: dict[int, int] | None = None) -> list[str]:
    """New shards holding exactly these samples' tar members, under the same file names (so data fingerprints,
    which hash shard file name and key, are comparable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_url: dict[str, list[tuple[str, int]]] = {}
    for key, _, _, pos, url in samples:
        by_url.setdefault(url, []).append((key, pos))
    paths = []
    for url, wanted in by_url.items():
        keep = {k for k, _ in wanted}
        members = []
        for raw in iter_shard(url, ShardReport(url)):
            if raw.key in keep:
                for ext, blob in raw.members.items():
                    if ext == "cls" and relabel is not None:
                        blob = str(relabel[int(blob)]).encode()
                    members.append((f"{raw.key}.{ext}", blob))
        paths.append(write_tar(out_dir / Path(url).name, members))
    return paths


def _eval(data, models, shards, out, classes=None, **kw) -> dict:
    return evaluate(EvalConfig(models=tuple(models), data=tuple(shards), task="zeroshot", out=str(out),
                               classes=classes or data["classes"], **FAST, **kw))


def _same_scores(a: dict, b: dict) -> None:
    assert a["data"]["samples"] == b["data"]["samples"] and a["data"]["fingerprint"] == b["data"]["fingerprint"]
    for ma, mb in zip(a["models"], b["models"], strict=True):
        for k in ("top1", "macro_f1", "weighted_f1", "predictions", "confusion"):
            assert ma["metrics"][k] == mb["metrics"][k], k
        assert ma["metrics"]["per_class"] == mb["metrics"]["per_class"]


def test_eval_on_a_filtered_test_set_equals_eval_on_only_those_samples(data, subset_run, tmp_path):
    subset = Subset(include=("shard-00001.tar", "00002000[0-4]"), exclude=("re:3$",))
    chosen = [s for s in data["samples"] if subset.keeps(key=s[0], shard=s[1])]
    assert 0 < len(chosen) < 30
    models = [data["teacher"], str(subset_run[0])]
    filtered = _eval(data, models, data["shards"], tmp_path / "f", subset=subset)
    alone = _eval(data, models, _write_shards_of(chosen, tmp_path / "only"), tmp_path / "o")
    _same_scores(filtered, alone)
    assert filtered["data"]["subset"]["filtered_out"] == 30 - len(chosen)
    assert "- subset: --include 'shard-00001.tar'" in (tmp_path / "f" / "report.md").read_text()


def test_eval_labels_score_among_those_classes(data, subset_run, tmp_path):
    chosen = [s for s in data["samples"] if s[2] in (0, 2)]
    filtered = _eval(data, [data["teacher"]], data["shards"], tmp_path / "f", subset=Subset(labels=("red", "blue")))
    two = tmp_path / "two.txt"
    two.write_text("red\nblue\n")
    alone = _eval(data, [data["teacher"]], _write_shards_of(chosen, tmp_path / "only", relabel={0: 0, 2: 1}),
                  tmp_path / "o", classes=str(two))
    _same_scores(filtered, alone)
    assert filtered["classes"]["names"] == ["red", "blue"] and filtered["classes"]["vocabulary_ids"] == [0, 2]
    assert filtered["samples"]["labels"] == alone["samples"]["labels"]
    # a run's head is its cache's whole vocabulary: --labels takes its rows of it
    # (and agreement from the cache narrows the cached head the same way)
    run_rep = _eval(data, [str(subset_run[0])], data["shards"], tmp_path / "r", subset=Subset(labels=(0, 2)),
                    cache=data["cache"])
    assert len(run_rep["models"][0]["metrics"]["per_class"]["support"]) == 2
    assert run_rep["agreement"]["available"] and "top1_agreement" in run_rep["models"][0]["agreement"]


def test_eval_filter_errors(data, tmp_path):
    with pytest.raises(EvalError, match="the filter --include 'nothing' keeps no usable samples"):
        _eval(data, [data["teacher"]], data["shards"], tmp_path / "e", subset=Subset(include=("nothing",)))
    with pytest.raises(EvalError, match="--labels 'red': a class name needs a vocabulary and --task retrieval"):
        evaluate(EvalConfig(models=(data["teacher"],), data=data["shards"], task="retrieval", out=str(tmp_path / "r"),
                            subset=Subset(labels=("red",)), progress=False))
    r = CliRunner().invoke(eval_cmd, ["--model", data["teacher"], "--data", data["shards"][0], "--task", "zeroshot",
                                      "--classes", data["classes"], "--out", str(tmp_path / "c"), "--labels", "mauve",
                                      "--no-progress"])
    assert r.exit_code != 0 and "'mauve': not a class of --classes" in r.output and "Traceback" not in r.output


def test_eval_cli_filters(data, tmp_path):
    shards = [a for url in data["shards"] for a in ("--data", url)]
    r = CliRunner().invoke(eval_cmd, ["--model", data["teacher"], *shards, "--task", "zeroshot",
                                      "--classes", data["classes"], "--out", str(tmp_path / "c"), "--include",
                                      "shard-00002.tar", "--labels", "green", "--latency-repeats", "1",
                                      "--latency-batch", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    want = [s[0] for s in data["samples"] if s[1] == "shard-00002.tar" and s[2] == 1]
    assert rep["samples"]["keys"] == want and rep["classes"]["names"] == ["green"]
    assert rep["config"]["subset"] == {"include": ["shard-00002.tar"], "exclude": [], "labels": ["green"]}
    assert rep["data"]["subset"]["filter"]["labels"] == [1]  # as resolved against --classes
    assert np.all(np.array(rep["samples"]["labels"]) == 0)
