"""Run every bench/ script in sequence and collect their results into bench/results/latest.json and latest.md.

    python bench/run_all.py --quick          # smoke: every bench at its --quick size, ~2-3 minutes on 2 CPU cores
    python bench/run_all.py                  # the sizes below, about 10 minutes on a quiet 2-core machine
    python bench/run_all.py --only build read --extra read=--workers=1
    python bench/run_all.py --shared ../shared   # also: bytes on the real kdc-cifar10-rn18 teacher + CIFAR-10 test

Each bench runs as its own subprocess (`python bench/bench_X.py --out bench/results/X.json [--quick]`), its output
shown live and kept in bench/results/tmp/X.log. A bench whose script does not exist yet is skipped with a note; one
that fails is recorded as failed and the others still run. latest.md has, per bench, its table, the issue's targets
and whether each was met. A bench states its verdicts by putting `table` (Markdown) and `targets` (a list of
{name, value, target, met, note}) in its JSON; for one that does not, its Markdown tables are taken from its output
and the issue's targets are listed without a verdict.

Every figure is a ratio measured inside one bench run against a reference run beside it (interleaved, medians);
absolute seconds are printed but never judged. The load average before and after each bench is recorded: a busy
machine makes every ratio noisier (torch's OpenMP threads wait on each other when another process takes a core).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_build import fmt_value  # noqa: E402

ROOT = HERE.parent
RESULTS = HERE / "results"

# (name, script, extra args for the full run). The order puts the cheap, robust benches first.
BENCHES = [
    ("build", "bench_build.py", []),                      # ViT-B-32, 192 real-sized JPEGs, 3 rounds: ~2 min
    ("teacher", "bench_teacher.py", ["--repeats", "3"]),   # ViT-B-32 batch 32 vs a same-shaped GEMM: ~1 min
    ("read", "bench_read.py", []),                        # 512 JPEGs + 16k captions, tiny + seed students: ~50 s
    ("scaling", "bench_scaling.py", []),                  # N = 1024..16384, 2 rounds + warm-up: ~1.5 min
    ("online", "bench_online.py", []),                    # offline vs online KD (issue 5 item 4)
    ("memory", "bench_memory.py", []),                    # peak RSS of train ÷ student-only loop (item 6)
    ("bytes", "bench_bytes.py", []),                      # bytes per sample-view, lossy storage (item 5)
    ("views", "bench_views.py", []),                      # strong views: record bytes, build and loader cost: ~5 min
    ("store", "bench_store.py", []),                      # train epoch from loopback S3 ÷ local disk: ~4 min
]

# The issue's targets, listed for a bench whose JSON does not state its own.
ISSUE_TARGETS = {
    "build": ["kdcache build ÷ serial loop ≥ 0.95 (≥ 1.0 where overlap can win)", "÷ naive loop ≥ 1.0",
              "÷ bare teacher forward ≥ 0.95 (GPU)"],
    "teacher": ["teacher FLOP/s ÷ matmul FLOP/s: reported, with where the rest goes"],
    "read": ["cache-only loader ÷ uncompressed copy ≥ 0.7", "cache-only loader ÷ tiny student step ≥ 20",
             "image loader ÷ image student step: reported, with what bounds it"],
    "online": ["offline epoch ≥ 5× faster than online (--online-teacher)", "≥ 0.5× the FLOP-predicted ratio"],
    "bytes": ["bytes on disk per sample-view ÷ raw fp16 bytes; metadata overhead",
              "lossy: ≤ 0.5× raw fp16 bytes with min cosine ≥ 0.999 and ≥ 99.5% top-1 agreement"],
    "memory": ["peak process-tree RSS of kdcache train ÷ student-only loop ≤ 1.2"],
    "scaling": ["(t(4N) − t(N)) ÷ (t(16N) − t(4N)) near 1/4 (linear)", "flat peak memory"],
    "store": ["train epoch reading the cache from an S3 endpoint on loopback ÷ from local disk: reported (issue 13)"],
}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine_info() -> dict:
    import numpy
    import PIL
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info = {"cores": os.cpu_count(), "affinity": affinity, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__, "cuda": torch.cuda.is_available()}
    for mod in ("open_clip", "zarr", "numcodecs"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                                  if line.startswith("model name")), None)
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
        info["cpu_simd"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    info["git_commit"] = _run(["git", "rev-parse", "--short", "HEAD"])
    info["git_dirty"] = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    try:
        import torch.backends.mkldnn

        info["mkldnn"] = torch.backends.mkldnn.is_available()
    except ImportError:
        pass
    return info


def load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_bench(name: str, script: str, extra: list[str], *, quick: bool, timeout: float) -> dict:
    path = HERE / script
    if not path.exists():
        print(f"\n=== {name}: {script} does not exist yet, skipped", flush=True)
        return {"script": script, "status": "skipped", "note": f"{script} not found"}
    out = RESULTS / f"{name}.json"
    if out.exists():
        out.unlink()  # never report a previous run's numbers as this run's
    supports_quick = '"--quick"' in path.read_text()
    cmd = [sys.executable, str(path), "--out", str(out), *(["--quick"] if quick and supports_quick else []), *extra]
    log_path = RESULTS / "tmp" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    if quick and not supports_quick:
        print(f"    ({script} has no --quick: running it at its default size)", flush=True)
    rec = {"script": script, "command": " ".join(["python", f"bench/{script}", "--out", f"bench/results/{name}.json",
                                                   *cmd[4:]]), "load_before": load()}
    t0 = time.perf_counter()
    lines: list[str] = []
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "PYTHONWARNINGS": "ignore"})
            watchdog = threading.Timer(timeout, proc.kill)  # a hung bench is killed, the others still run
            watchdog.start()
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                lines.append(line.rstrip("\n"))
            rc = proc.wait()
            watchdog.cancel()
    except OSError as e:
        return {**rec, "status": "failed", "note": str(e)}
    rec.update(seconds=round(time.perf_counter() - t0, 1), rc=rc, load_after=load(),
               log=str(log_path.relative_to(ROOT)))
    if rc != 0 or not out.exists():
        tail = "\n".join(lines[-15:])
        rec.update(status="failed", note=f"exit code {rc}" + ("" if out.exists() else f", no {out.name}"),
                   output_tail=tail)
        return rec
    rec.update(status="ok", result=json.loads(out.read_text()))
    rec["stdout_tables"] = _tables(lines)
    return rec


def _tables(lines: list[str]) -> list[str]:
    """The Markdown tables a bench printed (consecutive lines starting with '|')."""
    tables, cur = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append("\n".join(cur))
            cur = []
    return tables


VERDICT = {True: "met", False: "**NOT met**", None: "not judged"}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt_value(v, ".3g")
    return str(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    out = [f"# kdcache bench results{' (--quick: smoke sizes, noisy)' if report['quick'] else ''}", "",
           f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(report['started']))}, {report['seconds']:.0f} s in all. "
           f"Machine: {m.get('cpu_model')}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
           f"open_clip {m.get('open_clip')}, zarr {m.get('zarr')}, commit {m.get('git_commit')}"
           f"{' (uncommitted changes)' if m.get('git_dirty') else ''}.", "",
           "Every figure is a ratio against a reference measured in the same run, interleaved, median [min-max] "
           "over rounds; seconds are shown, never judged. Load average before/after each bench is listed: above "
           "~1 on 2 cores the ratios are noisy."
           + (" With --quick, sizes are smoke sizes: per-run fixed costs weigh far more than at full size, so the "
              "verdicts below check the plumbing, not the targets." if report["quick"] else ""),
           "", "## Targets", ""]
    rows = []
    for name, b in report["benches"].items():
        targets = (b.get("result") or {}).get("targets")
        if targets:
            rows += [[name, t["name"], _fmt(t["value"]), t["target"], VERDICT[t["met"]], t.get("note", "")]
                     for t in targets]
        else:
            why = {"skipped": "bench not present", "failed": "bench failed"}.get(b["status"], "no verdict in JSON")
            rows += [[name, t, "-", "-", why, ""] for t in ISSUE_TARGETS.get(name, [])]
    out += ["| bench | target | value | wanted | verdict | note |", "|---|---|---:|---|---|---|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    for name, b in report["benches"].items():
        out += ["", f"## {name}", ""]
        status = b["status"]
        if status != "ok":
            out += [f"{status}: {b.get('note', '')}"]
            if b.get("output_tail"):
                out += ["", "```", b["output_tail"], "```"]
            continue
        res = b["result"]
        out += [f"`{b['command']}` — {b['seconds']:.0f} s, load {b['load_before']:.2f} → {b['load_after']:.2f}", ""]
        if res.get("header"):
            out += [res["header"], ""]
        tables = [res["table"]] if res.get("table") else b.get("stdout_tables", [])
        for t in tables:
            out += [t, ""]
        out += ["Targets (from the issue):", ""]
        if res.get("targets"):
            for t in res["targets"]:
                out.append(f"- {t['name']}: {_fmt(t['value'])} (wanted {t['target']}) — {VERDICT[t['met']]}"
                           + (f"; {t['note']}" if t.get("note") else ""))
        else:
            out += [f"- {t} — not judged (the bench's JSON has no `targets`)" for t in ISSUE_TARGETS.get(name, [])]
        for note in [res.get("explanation"), *res.get("notes", [])]:
            if note:
                out += ["", note]
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every bench at its --quick size (smoke, ~3 minutes)")
    ap.add_argument("--only", nargs="*", default=None, help=f"bench names ({', '.join(b[0] for b in BENCHES)})")
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                    help="extra arguments for one bench, e.g. read=--workers=1 (comma-separated)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per bench before it is killed")
    ap.add_argument("--shared", default=os.environ.get("KDCACHE_SHARED"), metavar="DIR",
                    help="a directory with teachers/kdc-cifar10-rn18 and data/cifar10 (default: $KDCACHE_SHARED): "
                         "adds 'bytes-real', the lossy-storage bench on that trained teacher and real images, the "
                         "one that can judge zero-shot agreement")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"))
    args = ap.parse_args(argv)
    benches = list(BENCHES)
    extra: dict[str, list[str]] = {}
    if args.shared:
        # Its arguments name its inputs, so they go in as extra arguments: kept with --quick too.
        shared = Path(args.shared).resolve()
        benches.append(("bytes-real", "bench_bytes.py", []))
        extra["bytes-real"] = ["--teacher", f"local-dir:{shared / 'teachers' / 'kdc-cifar10-rn18'}",
                               "--images", str(shared / "data" / "cifar10" / "cifar10-test-000.tar"),
                               "--classes", "cifar10", "--limit", "2000", "--steps", "200"]
    for e in args.extra:
        name, _, rest = e.partition("=")
        extra.setdefault(name, []).extend(a for a in rest.split(",") if a)
    known = {b[0] for b in benches}
    for name in [*(args.only or []), *args.skip, *extra]:
        if name not in known:
            raise SystemExit(f"unknown bench {name!r}; known: {', '.join(sorted(known))}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"started": started, "quick": args.quick, "command": " ".join(["python", "bench/run_all.py",
                                                                            *(argv or sys.argv[1:])]),
              "machine": machine_info(), "benches": {}}
    for name, script, full_args in benches:
        if (args.only and name not in args.only) or name in args.skip:
            continue
        report["benches"][name] = run_bench(name, script, ([] if args.quick else full_args) + extra.get(name, []),
                                            quick=args.quick, timeout=args.timeout)
    report["seconds"] = time.time() - started
    report["finished"] = time.time()
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print("\n" + "=" * 100 + "\n")
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
