"""Caches on object stores: build, resume, overwrite, info, verify, train and eval with --out/--cache as fsspec URLs,
against a real S3 endpoint on loopback (moto's server mode, started here) and fsspec's memory://.

Credentials come from the environment only (dummy ones, distinctive strings), and a test greps everything written
for them: every object of the bucket, every file of the run directory and report, the commands' output and the
captured logs. The S3 tests skip cleanly when moto or s3fs is not installed (`pip install -e '.[test]'`).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner
from conftest import assert_identical_caches
from safetensors.torch import load_file

from kdcache import location
from kdcache.cache import schema
from kdcache.cache.config import BuildError
from kdcache.cache.reader import CacheError, open_cache
from kdcache.cli.main import cli

BUCKET = "kdcache-test"
# Dummy credentials in the AWS formats, distinctive enough that a grep cannot match anything else.
KEY_ID = "AKIAKDCACHETESTKEY42"
SECRET = "kdcacheTestSecret/0123456789+abcdefghijkl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_s3fs() -> None:
    """Close every cached s3fs client on the event loop it runs on (zarr's for zarr's stores, fsspec's for the rest),
    then forget the instances: none may point at an old endpoint, and an unclosed aiohttp session left to the garbage
    collector is an error under -W error."""
    import s3fs
    from fsspec.asyn import sync as fsspec_sync
    from zarr.core.sync import sync as zarr_sync

    for inst in list(s3fs.S3FileSystem._cache.values()):
        client = getattr(inst, "_s3", None)
        if client is None:
            continue
        if inst.asynchronous:
            zarr_sync(client.close())
        else:
            fsspec_sync(inst.loop, client.close)
        inst._s3 = None
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port) with one bucket; credentials and endpoint through the environment
    (subprocesses inherit it), the user's own AWS config files hidden. Stopped after the module."""
    pytest.importorskip("s3fs")
    server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")

    port = _free_port()
    srv = server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    aws = tmp_path_factory.mktemp("aws")
    mp = pytest.MonkeyPatch()
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        mp.delenv(k, raising=False)
    for k, v in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_CONFIG_FILE": str(aws / "config"),
                 "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials")}.items():
        mp.setenv(k, v)
    _reset_s3fs()  # none bound to another endpoint
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        _reset_s3fs()
        srv.stop()
        mp.undo()


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.slow)])
def store(request):
    """A fresh URL prefix on each store: `store("cache.zarr")` -> memory://kdc-<id>/cache.zarr or s3://bucket/<id>/..."""
    tag = uuid.uuid4().hex[:12]
    if request.param == "s3":
        request.getfixturevalue("s3")
        yield lambda name: f"s3://{BUCKET}/{tag}/{name}"
        return
    yield lambda name: f"memory://kdc-{tag}/{name}"
    if location.exists(f"memory://kdc-{tag}"):
        location.remove(f"memory://kdc-{tag}")


def _build(out, teacher_spec, shards, classes_file, *extra) -> list[str]:
    args = ["build", "--teacher", teacher_spec, "--out", str(out), "--views", "2", "--classes", classes_file,
            "--templates", "photo", "--batch-size", "4", "--threads", "1", "--no-progress"]
    for s in shards:
        args += ["--images", s]
    return args + list(extra)


def _train(cache, out, *extra) -> list[str]:
    return ["train", "--cache", str(cache), "--tower", "image", "--student", "kdc-tiny-image", "--out", str(out),
            "--max-steps", "4", "--batch-size", "8", "--threads", "1", "--loss", "cosine=1", "--loss", "kl=0.5",
            "--no-progress", *extra]


def _invoke(*args):
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0, r.output
    return r


def _objects(url: str) -> list[str]:
    """Every object under a URL, relative to it, listed by fsspec (a fresh listing)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(p[len(root.rstrip("/")) + 1:] for p in fs.find(root))


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, teacher_spec, shards, classes_file):
    """The same build on local disk, and a 4-step run on it: what every store must reproduce exactly."""
    d = tmp_path_factory.mktemp("local")
    _invoke(*_build(d / "cache.zarr", teacher_spec, shards[:2], classes_file))
    _invoke(*_train(d / "cache.zarr", d / "run"))
    return d


# ------------------------------------------------------------------------------------------------ the one helper

def test_location_tells_local_from_url_and_refuses_passwords(tmp_path):
    assert location.is_url("s3://b/c.zarr") and location.is_url("memory://x") and not location.is_url("c.zarr")
    assert not location.exists(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert not location.exists(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    assert location.exists(str(tmp_path / "file")) and not location.holds_zarr_group(str(tmp_path / "file"))
    url = f"memory://kdc-{uuid.uuid4().hex[:8]}/c.zarr"
    assert not location.exists(url)
    zarr.open_group(url, mode="w")
    assert location.exists(url) and location.holds_zarr_group(url)
    assert location.store_location(zarr.open_group(url, mode="r").store) == url.replace("memory://", "memory:///")
    location.remove(url)
    assert not location.exists(url)
    with pytest.raises(location.LocationError, match="--out: the URL holds credentials") as e:
        location.check_location("https://me:hunter2@example.com/c.zarr", "--out")
    assert "hunter2" not in str(e.value)
    # Azure's container@account is not a password
    assert location.check_location("abfs://box@acct.dfs.core.windows.net/c.zarr", "--out")
    with pytest.raises(location.LocationError, match="Protocol not known"):
        location.exists("nosuchproto://x/y")


# ----------------------------------------------------------------------------------- build, info, verify, train

def test_build_info_verify_train_on_a_store_match_local_disk(store, local_ref, teacher_spec, shards, classes_file,
                                                             tmp_path):
    url = store("cache.zarr")
    r = _invoke(*_build(url, teacher_spec, shards[:2], classes_file))
    assert f"status: {schema.CACHE_COMPLETE}" in r.output
    assert url.split("://")[1].lstrip("/") in r.output  # the summary names the URL, not a store object
    assert_identical_caches(url, local_ref / "cache.zarr")
    keys = _objects(url)
    assert "zarr.json" in keys and f"{schema.STATUS}/images-00001/zarr.json" in keys
    # each unit owns whole chunks: every chunk object of a unit lies under its own prefix
    units = {k.split("/")[1] for k in keys if k.startswith(f"{schema.IMAGES}/") and k.count("/") > 1}
    assert units == {"00000", "00001"}

    r = _invoke("info", url)
    assert url in r.output and "images      20 samples in 2 shards" in r.output
    r = _invoke("verify", url, "--no-progress")
    assert "OK" in r.output
    key = str(zarr.open_group(url, mode="r")[f"{schema.IMAGES}/00001/key"][0])
    _invoke("show", url, "--key", key, "--out", str(tmp_path / "views.png"))
    assert (tmp_path / "views.png").stat().st_size > 0

    run = tmp_path / "run"
    _invoke(*_train(url, run))
    a, b = load_file(str(run / "final" / "student.safetensors")), \
        load_file(str(local_ref / "run" / "final" / "student.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "training from the URL differs from local"
    assert open_cache(url).fingerprint() == open_cache(str(local_ref / "cache.zarr")).fingerprint()


def test_resume_and_append_on_a_store(store, local_ref, teacher_spec, shards, classes_file):
    url = store("cache.zarr")
    _invoke(*_build(url, teacher_spec, shards[:1], classes_file))
    r = CliRunner().invoke(cli, _build(url, teacher_spec, shards[:2], classes_file))
    assert r.exit_code != 0 and "already exists" in r.output and "Traceback" not in r.output
    _invoke(*_build(url, teacher_spec, shards[:2], classes_file, "--resume"))  # appends shard 1
    assert_identical_caches(url, local_ref / "cache.zarr")
    # a unit whose status object is gone is not done: --resume writes it again, the result is the same cache
    location.remove(f"{url}/{schema.STATUS}/images-00000")
    assert f"{schema.STATUS}/images-00000/zarr.json" not in _objects(url)
    r = _invoke(*_build(url, teacher_spec, shards[:2], classes_file, "--resume"))
    assert "this run: 10 images" in r.output
    assert_identical_caches(url, local_ref / "cache.zarr")


def test_overwrite_deletes_through_fsspec_and_never_a_foreign_prefix(store, teacher_spec, shards, classes_file):
    import fsspec

    url = store("cache.zarr")
    _invoke(*_build(url, teacher_spec, shards[:2], classes_file))
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe(f"{root}/images/00007/stray", b"left by someone")
    _invoke(*_build(url, teacher_spec, shards[:1], classes_file, "--overwrite"))
    keys = _objects(url)
    assert not any(k.startswith(("images/00001/", "images/00007/")) for k in keys), keys
    assert open_cache(url).attrs["summary"]["images"] == 10
    # a prefix holding other data is never deleted or built into
    data = store("somebody-elses")
    fs.pipe(f"{fsspec.core.url_to_fs(data)[1]}/notes.txt", b"precious")
    for extra, msg in (((), "already exists"), (("--overwrite",), "does not look like a zarr cache")):
        r = CliRunner().invoke(cli, _build(data, teacher_spec, shards[:1], classes_file, *extra))
        assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output
    assert _objects(data) == ["notes.txt"]


def test_verify_reports_an_object_deleted_from_s3(s3, teacher_spec, shards, classes_file):
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/cache.zarr"
    _invoke(*_build(url, teacher_spec, shards[:2], classes_file))
    prefix = url[len(f"s3://{BUCKET}/"):]
    chunk = next(k for k in _objects(url) if k.startswith("images/00001/emb/c/"))
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/{chunk}")  # behind kdcache's back, with another client
    r = CliRunner().invoke(cli, ["verify", url, "--no-progress"])
    assert r.exit_code == 1, r.output
    assert f"images/00001/emb: chunk images/00001/emb/{chunk.rsplit('/emb/', 1)[1]} is missing" in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_build_killed_on_s3_resumes_to_the_identical_cache(s3, local_ref, teacher_spec, shards, classes_file,
                                                          tmp_path_factory):
    """kill -9 of a build writing to S3 (a subprocess: it inherits the endpoint and credentials), then --resume."""
    from kdcache.synth import write_image_shards

    many = write_image_shards(tmp_path_factory.mktemp("many-s3"), n_shards=8, per_shard=8, seed=5)
    ref = tmp_path_factory.mktemp("ref-s3") / "ref.zarr"
    _invoke(*_build(ref, teacher_spec, many, classes_file))
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli.main", *_build(url, teacher_spec, many, classes_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def done() -> int:
        return sum(k.endswith("zarr.json") for k in _objects(url) if k.startswith(f"{schema.STATUS}/images-"))
    deadline = time.time() + 180
    while (not location.exists(url) or done() < 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert 0 < done() < len(many), f"the kill landed outside the build ({done()} units done)"
    _invoke(*_build(url, teacher_spec, many, classes_file, "--resume"))
    assert_identical_caches(url, ref)


# -------------------------------------------------------------------------------------- errors, run dirs, eval

def test_bad_locations_are_one_line_errors(s3, teacher_spec, shards, classes_file, tmp_path):
    cases = [
        (["info", f"s3://{BUCKET}/nothing-here.zarr"], "no zarr cache there"),
        (["verify", "s3://no-such-bucket-kdc/c.zarr"], "no zarr cache there"),
        (_build("s3://no-such-bucket-kdc/c.zarr", teacher_spec, shards[:1], classes_file), "bucket does not exist"),
        (_build("nosuchproto://x/c.zarr", teacher_spec, shards[:1], classes_file), "Protocol not known"),
        (_build("https://me:hunter2@example.com/c.zarr", teacher_spec, shards[:1], classes_file),
         "--out: the URL holds credentials"),
        (["info", "https://me:hunter2@example.com/c.zarr"], "the URL holds credentials"),
        (_train(f"s3://{BUCKET}/x.zarr", "memory://runs/r"), "a run directory must be a local path"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output and "hunter2" not in r.output, (args, r.output)


def test_train_refuses_a_url_run_dir_before_anything_is_written(teacher_spec, shards, classes_file, tmp_path):
    from kdcache.train.config import TrainConfig, TrainError
    from kdcache.train.loop import run

    url = f"memory://kdc-{uuid.uuid4().hex[:8]}/run"
    with pytest.raises(TrainError, match="must be a local path"):
        run(TrainConfig(cache=str(tmp_path / "none.zarr"), tower="image", student="kdc-tiny-image", out=url,
                        max_steps=1, progress=False))
    assert not location.exists(url)


def test_eval_refuses_a_url_report_dir_before_any_work(teacher_spec, shards, classes_file, tmp_path):
    url = f"memory://kdc-{uuid.uuid4().hex[:8]}/report"
    r = CliRunner().invoke(cli, ["eval", "--model", teacher_spec, "--data", shards[0], "--task", "zeroshot",
                                 "--classes", classes_file, "--out", url, "--no-progress"])
    assert r.exit_code == 1 and "a report directory must be a local path" in r.output, r.output
    assert "Traceback" not in r.output and "top-1" not in r.output
    assert not location.exists(url) and not any(tmp_path.iterdir())
    assert not list(Path.cwd().glob("memory:*"))  # no local folder named after the URL


@pytest.mark.slow
def test_credentials_never_recorded_and_eval_reads_the_cache_from_s3(s3, teacher_spec, shards, classes_file, tmp_path,
                                                                     caplog):
    """Build (-v: debug logging on), info, verify, train with 1 worker, eval with --cache on S3, then grep every
    object in the bucket, every file written locally, the output and the logs for the key id and the secret."""
    caplog.set_level(logging.DEBUG)
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/cache.zarr"
    out = [_invoke("-v", *_build(url, teacher_spec, shards[:2], classes_file)).output,
           _invoke("info", url, "--json").output, _invoke("verify", url, "--no-progress").output,
           _invoke("-v", *_train(url, tmp_path / "run", "--workers", "1")).output]
    r = _invoke("eval", "--model", str(tmp_path / "run"), "--data", shards[0], "--task", "zeroshot", "--classes",
                classes_file, "--templates", "photo", "--cache", url, "--out", str(tmp_path / "report"),
                "--latency-repeats", "1", "--latency-batch", "2", "--latency-warmup", "0", "--no-progress")
    out.append(r.output)
    assert "top-1" in r.output
    assert '"cache": "' + url + '"' in (tmp_path / "run" / "config.json").read_text()
    # moto's server runs in this process: its own loggers see the request headers; they are not kdcache's logs
    logs = "\n".join(rec.getMessage() for rec in caplog.records if not rec.name.startswith(("moto", "werkzeug")))
    blobs = {f"s3://{BUCKET}/{o['Key']}": s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
             for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])}
    assert any(k.startswith(url) for k in blobs)
    blobs.update({str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()})
    assert any("config.json" in k for k in blobs) and any("report.json" in k for k in blobs)
    blobs["output"], blobs["logs"] = "\n".join(out).encode(), logs.encode()
    for secret in (KEY_ID, SECRET):
        leaks = [k for k, v in blobs.items() if secret.encode() in v]
        assert not leaks, f"a credential was written to {leaks[:5]}"


def test_unreachable_endpoint_is_a_one_line_error(monkeypatch, teacher_spec, shards, classes_file):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    _reset_s3fs()
    try:
        with pytest.raises(location.LocationError, match="cannot list the store"):
            location.exists("s3://kdcache-test/c.zarr")
        with pytest.raises(CacheError, match="s3://kdcache-test/c.zarr"):
            open_cache("s3://kdcache-test/c.zarr")
    finally:
        _reset_s3fs()


def test_remove_refuses_what_is_not_a_cache(tmp_path):
    from kdcache.cache.writer import remove_cache

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    with pytest.raises(BuildError, match="does not look like a zarr cache"):
        remove_cache(str(tmp_path / "d"))
    assert (tmp_path / "d" / "keep.txt").exists()
    url = f"memory://kdc-{uuid.uuid4().hex[:8]}/d"
    import fsspec

    fsspec.filesystem("memory").pipe(url[len("memory://"):] + "/keep.txt", b"x")
    with pytest.raises(BuildError, match="does not look like a zarr cache"):
        remove_cache(url)
    assert _objects(url) == ["keep.txt"]
