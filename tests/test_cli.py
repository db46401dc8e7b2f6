"""The command line as a user meets it: help texts, clear errors, quickstart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_cache

from kdcache.cache.reader import open_cache
from kdcache.cli.main import cli

COMMANDS = ["build", "pack", "info", "verify", "show", "train", "export", "eval", "compare", "quickstart"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_defaults_are_shown(command):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0, r.output
    cmd = cli.commands[command]
    for param in cmd.params:
        if getattr(param, "help", None) is None and param.param_type_name == "option":
            pytest.fail(f"{command} --{param.name} has no help")
    if command == "build":
        assert "[default: 64; x>=1]" in " ".join(r.output.split())  # --batch-size: default and range shown
        assert "--allow-random-init" in r.output


def test_top_level_help_lists_commands():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for c in COMMANDS:
        assert c in r.output


def test_missing_weights_are_refused_with_a_hint(tmp_path, teacher_dir, shards):
    bare = tmp_path / "no-weights"
    bare.mkdir()
    shutil.copy(teacher_dir / "open_clip_config.json", bare)
    r = CliRunner().invoke(cli, ["build", "--teacher", f"local-dir:{bare}", "--images", shards[0],
                                 "--out", str(tmp_path / "c.zarr"), "--no-progress"])
    assert r.exit_code != 0
    assert "--allow-random-init" in r.output
    assert not (tmp_path / "c.zarr").exists()


def test_missing_shard_is_a_clear_error(tmp_path, teacher_spec):
    r = CliRunner().invoke(cli, ["build", "--teacher", teacher_spec, "--images", str(tmp_path / "nope-{0..1}.tar"),
                                 "--out", str(tmp_path / "c.zarr"), "--no-progress"])
    assert r.exit_code != 0 and "nope-0.tar" in r.output


def test_resume_and_overwrite_are_exclusive(tmp_path, teacher_spec, shards):
    r = CliRunner().invoke(cli, ["build", "--teacher", teacher_spec, "--images", shards[0], "--out",
                                 str(tmp_path / "c.zarr"), "--resume", "--overwrite"])
    assert r.exit_code == 2 and "mutually exclusive" in r.output


def test_overwrite_rebuilds(tmp_path, teacher_spec, shards):
    out = tmp_path / "c.zarr"
    assert build_cache(out, teacher=teacher_spec, images=(shards[0],)).ok
    res = build_cache(out, teacher=teacher_spec, images=(shards[1],), overwrite=True)
    assert res.ok and open_cache(str(out)).attrs["inputs"]["images"] == [shards[1]]


def test_duplicate_keys_across_shards_are_kept_and_reported(tmp_path, teacher_spec, shards):
    copy = tmp_path / "copy.tar"
    shutil.copy(shards[0], copy)
    out = tmp_path / "dup.zarr"
    res = build_cache(out, teacher=teacher_spec, images=(shards[0], str(copy)))
    assert res.ok
    dups = res.summary["duplicate_keys"]
    assert dups["count"] == 10 and res.summary["images"] == 20
    key, rows = next(iter(dups["examples"].items()))
    assert rows == [f"images-00000:{int(key[-4:])}", f"images-00001:{int(key[-4:])}"]
    r = CliRunner().invoke(cli, ["info", str(out)])
    assert "duplicates  10 keys" in r.output


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    from kdcache.quickstart import REAL_TEACHER_COMMAND

    r = CliRunner().invoke(cli, ["quickstart", "--workdir", str(tmp_path / "qs")])
    assert r.exit_code == 0, r.output
    assert "meaningless" in r.output and "OK" in r.output
    assert open_cache(str(tmp_path / "qs" / "cache.zarr")).complete
    # The random teacher's table is printed as mechanics, not as a result: RANDOM, no Δ, a way to real numbers.
    assert "(teacher, RANDOM)" in r.output and "Δ top-1" not in r.output and "MECHANICS ONLY" in r.output
    assert r.output.index(REAL_TEACHER_COMMAND) > r.output.index("quickstart finished")  # it ends with the pointer
    assert "matplotlib" not in r.output
    # Every plot is written and its path printed: the two comparison plots and two per evaluated model.
    pngs = [line.split()[-1] for line in r.output.splitlines() if line.strip().startswith("plot ")]
    assert len(pngs) == 2 + 2 * 3 and all(p.endswith(".png") and Path(p).is_file() for p in pngs)
    assert {Path(p).name for p in pngs} >= {"compare-training.png", "compare-accuracy-latency.png"}


def test_quickstart_points_at_a_real_teacher_command_the_readme_shows():
    from kdcache.quickstart import REAL_TEACHER_COMMAND

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### `kdcache quickstart", 1)[1].split("\n## ", 1)[0]
    assert REAL_TEACHER_COMMAND in section
    script = Path(__file__).parents[1] / REAL_TEACHER_COMMAND.split()[1]
    assert script.is_file()


@pytest.mark.parametrize("args, message", [
    (["--student", "nope"], "unknown student 'nope'"),
    (["--tower", "text", "--student", "kdc-tiny-text", "--loss", "kl=1"], "applies to the image tower only"),
])
def test_train_errors_are_messages_not_tracebacks(tmp_path, teacher_spec, shards, args, message):
    out = tmp_path / "c.zarr"
    assert build_cache(out, teacher=teacher_spec, images=tuple(shards)).ok
    base = ["train", "--cache", str(out), "--tower", "image", "--student", "kdc-tiny-image", "--out",
            str(tmp_path / "run"), "--max-steps", "1", "--no-progress"]
    r = CliRunner().invoke(cli, base + args)
    assert r.exit_code == 1 and message in r.output
    assert not isinstance(r.exception, ValueError)  # handled: click's SystemExit, no traceback


def test_cli_choices_match_the_registries():
    # The CLI spells its choices out so that `kdcache --help` does not import torch; they must stay the registries'.
    from kdcache.constants import PRECISIONS, TOWERS
    from kdcache.eval.tasks import TASKS

    def choices(command, name):
        (param,) = [p for p in cli.commands[command].params if p.name == name]
        return tuple(param.type.choices)

    from kdcache.hints import POOLS

    assert choices("eval", "task") == tuple(TASKS)
    assert choices("build", "hint_pool") == choices("layers", "pool") == POOLS
    assert choices("train", "tower") == TOWERS
    assert choices("build", "precision") == choices("train", "precision") == choices("eval", "precision") == PRECISIONS
    from kdcache.shards.gpudecode import DECODERS
    from kdcache.train.replay import REPLAY_DECODERS

    assert choices("build", "decode") == DECODERS and choices("train", "decode") == REPLAY_DECODERS
