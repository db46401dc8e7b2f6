"""`kdcache compare`: the reports of several `kdcache eval` runs as one table, teacher first, with ratios.

    kdcache compare reports/teacher-vs-seed001 reports/teacher-vs-seed002 --out reports/compare.md
    kdcache compare reports/a reports/b --remeasure          # re-time every model side by side in this process

A model that appears in several reports (typically the teacher) is one row. Ratios against the teacher use timings
taken in the same process (same report) when there is one; otherwise they compare numbers from separate runs and are
marked with a dagger, since a busy machine or another device makes such ratios meaningless — `--remeasure` reloads
every model and times them all side by side. Plots (matplotlib, the optional `plot` extra): training curves of the runs
behind the reports and accuracy vs. latency, written next to the Markdown file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdcache.eval.report import REPORT_JSON, fmt_number, md_table
from kdcache.eval.tasks import TASKS, Task, get_task

PLOT_HINT = "pip install 'kdcache[plot]'  (or: pip install matplotlib)"
DAGGER = "†"


class CompareError(ValueError):
    """Reports that cannot be compared; the message names the report."""


@dataclass
class _Row:
    """One model in the comparison: the report it was read from and what that report says about it."""

    key: str
    model: dict
    report: dict
    report_dir: str
    label: str = ""
    in_reports: list[int] = field(default_factory=list)
    latency: dict = field(default_factory=dict)


def load_report(report_dir: str | os.PathLike) -> dict:
    """A report.json, with a clear error when the directory is not a report."""
    p = Path(report_dir) / REPORT_JSON
    if not p.is_file():
        raise CompareError(f"{report_dir}: no {REPORT_JSON} (not a `kdcache eval --out` directory)")
    try:
        rep = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CompareError(f"{p}: not valid JSON ({e})") from None
    if "models" not in rep or "task" not in rep:
        raise CompareError(f"{p}: not a kdcache eval report (no models/task)")
    if rep["task"] not in TASKS:
        raise CompareError(f"{p}: task {rep['task']!r} is not one this kdcache knows ({', '.join(TASKS)})")
    return rep


def model_key(m: dict) -> str:
    """What makes two report entries the same model: where it is loaded from and its weights."""
    r = m.get("reload") or {}
    return json.dumps([m["kind"], r.get("spec", m["spec"]), r.get("pretrained"), m.get("digest"),
                       sorted(m.get("weights_files") or [])])


def _collect_rows(reports: Sequence[dict], dirs: Sequence[str]) -> tuple[list[_Row], _Row | None, list[str]]:
    notes: list[str] = []
    rows: dict[str, _Row] = {}
    teacher_key = None
    for i, (rep, d) in enumerate(zip(reports, dirs, strict=True)):
        for m in rep["models"]:
            k = model_key(m)
            if m["is_teacher"] and teacher_key is None:
                teacher_key = k
            elif m["is_teacher"] and k != teacher_key:
                notes.append(f"{d} uses another teacher ({m['label']}); it is compared as a model against the teacher "
                             f"of the first report that has one.")
            if k not in rows:
                rows[k] = _Row(key=k, model=m, report=rep, report_dir=d)
            rows[k].in_reports.append(i)
    teacher = rows.get(teacher_key) if teacher_key else None
    # A student's "home" report is one it shares with the teacher, so its numbers and ratios are side by side.
    if teacher is not None:
        for r in rows.values():
            shared = [i for i in r.in_reports if i in teacher.in_reports]
            if shared and r is not teacher:
                i = shared[0]
                r.report, r.report_dir = reports[i], dirs[i]
                r.model = next(m for m in reports[i]["models"] if model_key(m) == r.key)
    ordered = sorted(rows.values(), key=lambda r: r is not teacher)
    labels = [r.model["label"] for r in ordered]
    for r in ordered:
        r.label = r.model["label"] if labels.count(r.model["label"]) == 1 else \
            f"{r.model['label']} [{Path(r.report_dir).name}]"
        r.latency = dict(r.model["latency"])
    return ordered, teacher, notes


def _check_data(reports: Sequence[dict], dirs: Sequence[str]) -> list[str]:
    tasks = {r["task"] for r in reports}
    if len(tasks) > 1:
        raise CompareError("the reports are of different tasks (" + ", ".join(
            f"{d}: {r['task']}" for r, d in zip(reports, dirs, strict=True)) + "); compare one task at a time")
    notes = []
    prints = {r["data"].get("fingerprint") for r in reports}
    if len(prints) > 1:
        notes.append("the reports evaluated different samples (" + ", ".join(
            f"{Path(d).name}: {r['data']['samples']} from {', '.join(r['data']['patterns'])}"
            for r, d in zip(reports, dirs, strict=True)) + "): accuracy differences mix models and data.")
    classes = {json.dumps(r.get("classes", {}).get("names")) for r in reports}
    if len(classes) > 1:
        notes.append("the reports used different --classes.")
    return notes


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


_f = fmt_number


def _signed(v) -> str:
    return "–" if v is None else f"{100 * v:+.2f}"


def _remeasure(rows: Sequence[_Row], *, device: str, batch: int, repeats: int, warmup: int) -> dict:
    from kdcache.eval import latency as lat
    from kdcache.eval.models import resolve_model

    models = []
    for r in rows:
        spec = r.model.get("reload") or {"spec": r.model["spec"]}
        models.append(resolve_model(spec["spec"], label=r.label, pretrained=spec.get("pretrained"),
                                    allow_random_init=bool(spec.get("allow_random_init")), device=device))
    t = lat.measure(models, batch=batch, repeats=repeats, warmup=warmup)
    for r in rows:
        r.latency = t.per_model[r.label]
    return t.conditions


def build_table(rows: Sequence[_Row], teacher: _Row | None, task: Task, *, remeasured: bool) -> tuple[str, list[str]]:
    """The comparison table and its footnotes; the task gives the metric and Δ columns and which parameters count."""
    batches = {r.latency.get("batch") for r in rows}
    b_hdr = f"img/s (batch {next(iter(batches))})" if len(batches) == 1 else "img/s (batch)"
    header = ["model", *(h for h, _ in task.metric_columns)]
    header += ["agree top-1", "cosine", "KL", "params", "MB", "ms/img", b_hdr, "×smaller", "×faster"]
    header += [h for h, _ in task.delta_columns]
    t_ms = teacher.latency.get("ms_per_image_b1") if teacher else None
    separate: list[str] = []
    out_rows = []
    for r in rows:
        m, met, ag = r.model, r.model["metrics"], r.model.get("agreement") or {}
        cells = [met[key] for _, key in task.metric_columns]
        name = f"**{r.label}** (teacher)" if r is teacher else r.label
        row = [name, *(_f(c, pct=True) for c in cells), _f(ag.get("top1_agreement"), pct=True),
               _f(ag.get("cosine"), digits=3), _f(ag.get("kl"), digits=3), _f(m[task.params_key]),
               _f(m["size_mb"]), _f(r.latency.get("ms_per_image_b1")),
               _f(r.latency.get("images_per_s"), digits=1) + ("" if len(batches) == 1 else
                                                             f" (b{r.latency.get('batch')})")]
        if teacher is None or r is teacher:
            row += ["–"] * 4
        else:
            tm = teacher.model
            smaller = _ratio(tm[task.params_key], m[task.params_key])
            # Side by side: the student's own report also timed the teacher, in the same process.
            same = remeasured or r.report is teacher.report
            t_lat = t_ms
            if not remeasured and not same:
                shared = next((x for x in r.report["models"] if model_key(x) == teacher.key), None)
                if shared is not None:
                    t_lat, same = shared["latency"]["ms_per_image_b1"], True
            faster = _ratio(t_lat, r.latency.get("ms_per_image_b1"))
            mark = "" if same else DAGGER
            if not same:
                separate.append(f"{r.label} ({Path(r.report_dir).name}, {r.report['timing']['device']}) vs teacher "
                                f"({Path(teacher.report_dir).name}, {teacher.report['timing']['device']})")
            tmet = tm["metrics"]
            deltas = [met[key] - tmet[key] for _, key in task.delta_columns]
            row += [_f(smaller, digits=1, suffix="×"), _f(faster, digits=2, suffix="×") + mark,
                    *(_signed(d) for d in deltas)]
        out_rows.append(row)
    notes = []
    if separate:
        notes.append(f"{DAGGER} timed in separate runs, not side by side, so the speed ratio is not trustworthy "
                     f"({'; '.join(separate)}); `kdcache compare --remeasure` re-times every model in one process.")
    notes.append(f"Metrics and Δ in %, Δ in percentage points vs the teacher. params = {task.params_what} parameters; "
                 f"×smaller = teacher params / model params{task.params_note}; ×faster = teacher ms/img / model ms/img "
                 "at batch 1. MB = checkpoint file(s) on disk. "
                 "Agreement columns are against each report's reference (see the reports).")
    return md_table(header, out_rows), notes


# ----------------------------------------------------------------------------------------------------------- plots

def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _read_metrics(run_dir: str) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_training(runs: dict[str, str], path: Path) -> bool:
    """Training loss and validation agreement/cosine against step, one colour per run. False if nothing to plot."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

    data = {label: _read_metrics(d) for label, d in runs.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return False
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    for i, (label, rows) in enumerate(data.items()):
        colour = f"C{i % 10}"
        train = [r for r in rows if r.get("kind") == "train"]
        val = [r for r in rows if r.get("kind") == "val"]
        if train:
            steps = [r["step"] for r in train]
            ax_loss.plot(steps, [r["loss"] for r in train], color=colour, label=f"{label}: loss")
            for term in sorted({k for r in train for k in r if k.endswith("_loss")}):
                ax_loss.plot(steps, [r.get(term) for r in train], color=colour, alpha=0.45, linewidth=0.8,
                             linestyle="--", label=f"{label}: {term}")
        if val:
            steps = [r["step"] for r in val]
            if any("val_top1_agreement" in r for r in val):
                ax_val.plot(steps, [r.get("val_top1_agreement") for r in val], color=colour, marker="o",
                            label=f"{label}: top-1 agreement")
            ax_val.plot(steps, [r.get("val_cosine") for r in val], color=colour, marker="s", linestyle="--",
                        label=f"{label}: cosine")
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training losses")
    ax_val.set(xlabel="step", ylabel="agreement with the teacher", title="Validation (cache's held-out rows)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return True


def plot_accuracy_latency(rows: Sequence[_Row], teacher: _Row | None, task: Task, path: Path) -> bool:
    """One point per model: the task's headline (top-1, or mean R@1 for retrieval) against ms per image at batch 1."""
    from matplotlib.figure import Figure

    pts = []
    for r in rows:
        y = task.headline(r.model["metrics"])
        x = r.latency.get("ms_per_image_b1")
        if x:
            pts.append((r, x, 100 * y))
    if not pts:
        return False
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for r, x, y in pts:
        ax.scatter([x], [y], marker="*" if r is teacher else "o", s=160 if r is teacher else 50,
                   color="C3" if r is teacher else "C0", zorder=3)
        ax.annotate(r.label + (" (teacher)" if r is teacher else ""), (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    xs = [x for _, x, _ in pts]
    if max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.margins(x=0.2, y=0.1)  # room for the labels written right of each point
    ax.set(xlabel="ms per image (batch 1)", ylabel=task.headline_label,
           title="Accuracy vs latency")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    return True


# --------------------------------------------------------------------------------------------------------- compare

def compare(report_dirs: Sequence[str], *, out: str | None = None, remeasure: bool = False,
            runs: Sequence[str] = (), device: str = "cpu", latency_batch: int | None = None,
            latency_repeats: int = 10, latency_warmup: int = 2) -> str:
    """The comparison as Markdown. With `out`, also write it there and the PNG plots next to it, and print each
    path written. `runs`: more training-run directories whose curves to plot (exported models do not record their
    run). `remeasure`: reload every model and time them side by side on `device`."""
    text, written = write_compare(report_dirs, out=out, remeasure=remeasure, runs=runs, device=device,
                                  latency_batch=latency_batch, latency_repeats=latency_repeats,
                                  latency_warmup=latency_warmup)
    for p in written:
        print(f"wrote {p}")
    if out is not None and not have_matplotlib():
        print(f"no plots: matplotlib is not installed ({PLOT_HINT})")
    return text


def write_compare(report_dirs: Sequence[str], *, out: str | None = None, remeasure: bool = False,
                  runs: Sequence[str] = (), device: str = "cpu", latency_batch: int | None = None,
                  latency_repeats: int = 10, latency_warmup: int = 2) -> tuple[str, list[Path]]:
    """`compare` without printing: (Markdown, paths written: the Markdown file first, then the plots)."""
    if not report_dirs:
        raise CompareError("give at least one REPORT_DIR")
    dirs = [str(d) for d in report_dirs]
    reports = [load_report(d) for d in dirs]
    notes = _check_data(reports, dirs)
    task = get_task(reports[0]["task"])
    rows, teacher, more = _collect_rows(reports, dirs)
    notes += more
    if teacher is None:
        notes.append("no report has a teacher among its models: no ratios.")
    timing = None
    if remeasure:
        batch = latency_batch or reports[0]["timing"]["batch"]
        timing = _remeasure(rows, device=device, batch=batch, repeats=latency_repeats, warmup=latency_warmup)
    table, table_notes = build_table(rows, teacher, task, remeasured=remeasure)

    lines = ["# kdcache compare", ""]
    for rep, d in zip(reports, dirs, strict=True):
        lines.append(f"- `{d}`: {rep['task']} on {rep['data']['samples']} samples from "
                     f"{', '.join(rep['data']['patterns'])}; timed "
                     f"{'side by side ' if rep['timing'].get('side_by_side') else ''}on {rep['timing']['device']} "
                     f"({rep['created']})")
    if timing is not None:
        lines.append(f"- **re-measured**: all {len(rows)} models timed side by side in one process on "
                     f"{timing['device']} ({timing['warmup']} warm-up + {timing['repeats']} calls, medians)")
    lines += ["", table, "", *(f"- {n}" for n in table_notes + notes), ""]

    written: list[Path] = []
    if out is not None:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        lines += ["## Plots", ""]
        if have_matplotlib():
            run_dirs = {r.label: r.model["provenance"]["run"] for r in rows if r.model["kind"] == "run"}
            for extra in runs:
                run_dirs.setdefault(Path(extra).name, str(extra))
            stem = out_path.with_suffix("")
            curves = Path(f"{stem}-training.png")
            acc = Path(f"{stem}-accuracy-latency.png")
            if plot_training(run_dirs, curves):
                written.append(curves)
                lines.append(f"![training curves]({curves.name})")
            else:
                lines.append("No training curves: no training run among the models (exports do not record their "
                             "run; pass it with --run RUN).")
            if plot_accuracy_latency(rows, teacher, task, acc):
                written.append(acc)
                lines.append(f"![accuracy vs latency]({acc.name})")
        else:
            lines.append(f"Plots not written: matplotlib is not installed. `{PLOT_HINT}` and rerun compare.")
        lines.append("")
    text = "\n".join(lines)
    if out is not None:
        Path(out).write_text(text, encoding="utf-8")
        written.insert(0, Path(out))
    return text, written
