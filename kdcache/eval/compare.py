"""`kdcache compare`: the reports of several `kdcache eval` runs as one table, teacher first, with ratios.

    kdcache compare reports/teacher-vs-seed001 reports/teacher-vs-seed002 --out reports/compare.md
    kdcache compare reports/a reports/b --remeasure          # re-time every model side by side in this process

A model that appears in several reports (typically the teacher) is one row. Ratios against the teacher use timings
taken in the same process (same report) when there is one; otherwise they compare numbers from separate runs and are
marked with a dagger, since a busy machine or another device makes such ratios meaningless — `--remeasure` reloads
every model and times them all side by side. Rows are named short (a directory's or config's name, an open_clip name;
`kdcache.eval.report.short_names`) and the full specs are listed under the table. A teacher with random weights is
marked RANDOM and no Δ against it is shown. With `--out`, two PNGs go next to the Markdown file: training curves of
the runs behind the reports, and accuracy vs. latency (`kdcache.eval.plots`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdcache.eval import metrics as M
from kdcache.eval import plots
from kdcache.eval.report import REPORT_JSON, fmt_number, md_table, short_names
from kdcache.eval.tasks import TASKS, Task, get_task

DAGGER = "†"
RANDOM = "RANDOM"


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
    names = short_names([r.model for r in ordered], contexts=[Path(r.report_dir).name for r in ordered])
    for r, name in zip(ordered, names, strict=True):
        r.label = name
        r.latency = dict(r.model["latency"])
    return ordered, teacher, notes


def is_random_init(m: dict) -> bool:
    """Whether a report entry is a teacher-form model built with random weights (its identity says so)."""
    return bool(((m.get("provenance") or {}).get("identity") or {}).get("random_init"))


def _model_list(rows: Sequence[_Row], teacher: _Row | None) -> list[str]:
    """The full spec behind each short row name, for the lines under the table."""
    out = []
    for r in rows:
        m = r.model
        reload = m.get("reload") or {}
        spec = reload.get("spec") or m["spec"]
        extra = [f"--pretrained {reload['pretrained']}"] if reload.get("pretrained") else []
        if is_random_init(m):
            extra.append("random weights")
        role = "teacher, " if r is teacher else ""
        out.append(f"`{r.label}`: {role}{m['kind']} `{spec}`" + (f" ({', '.join(extra)})" if extra else ""))
    return out


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
    """The comparison table and its footnotes; the task gives the metric and Δ columns and which parameters count.
    Against a teacher with random weights, accuracy differences say nothing: its row is marked RANDOM and the Δ
    columns are left out (size and speed ratios still hold)."""
    batches = {r.latency.get("batch") for r in rows}
    b_hdr = f"img/s (batch {next(iter(batches))})" if len(batches) == 1 else "img/s (batch)"
    random_teacher = teacher is not None and is_random_init(teacher.model)
    deltas_shown = not random_teacher
    header = ["model", *(h for h, _ in task.metric_columns)]
    header += ["agree top-1", "cosine", "KL", "params", "MB", "ms/img", b_hdr, "×smaller", "×faster"]
    header += [h for h, _ in task.delta_columns] if deltas_shown else []
    t_ms = teacher.latency.get("ms_per_image_b1") if teacher else None
    separate: list[str] = []
    out_rows = []
    for r in rows:
        m, met, ag = r.model, r.model["metrics"], r.model.get("agreement") or {}
        cells = [met[key] for _, key in task.metric_columns]
        name = (f"**{r.label}** (teacher, {RANDOM})" if random_teacher else f"**{r.label}** (teacher)") \
            if r is teacher else r.label
        row = [name, *(_f(c, pct=True) for c in cells), _f(ag.get("top1_agreement"), pct=True),
               _f(ag.get("cosine"), digits=3), _f(ag.get("kl"), digits=3), _f(m[task.params_key]),
               _f(m["size_mb"]), _f(r.latency.get("ms_per_image_b1")),
               _f(r.latency.get("images_per_s"), digits=1) + ("" if len(batches) == 1 else
                                                             f" (b{r.latency.get('batch')})")]
        if teacher is None or r is teacher:
            row += ["–"] * (2 + (len(task.delta_columns) if deltas_shown else 0))
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
            row += [_f(smaller, digits=1, suffix="×"), _f(faster, digits=2, suffix="×") + mark]
            if deltas_shown:
                row += [_signed(met[key] - tm["metrics"][key]) for _, key in task.delta_columns]
        out_rows.append(row)
    notes = []
    if random_teacher:
        notes.append(f"The teacher, {teacher.label}, has {RANDOM} weights (random init): its scores are chance, not a "
                     "reference, so no Δ against it is shown and no model here can be said to beat it. The agreement, "
                     "size and speed columns still hold.")
    if separate:
        notes.append(f"{DAGGER} timed in separate runs, not side by side, so the speed ratio is not trustworthy "
                     f"({'; '.join(separate)}); `kdcache compare --remeasure` re-times every model in one process.")
    notes.append(("Metrics and Δ in %, Δ in percentage points vs the teacher. " if deltas_shown else "Metrics in %. ")
                 + f"params = {task.params_what} parameters; "
                 f"×smaller = teacher params / model params{task.params_note}; ×faster = teacher ms/img / model ms/img "
                 "at batch 1. MB = checkpoint file(s) on disk. "
                 "Agreement columns are against each report's reference (see the reports).")
    return md_table(header, out_rows), notes


# --------------------------------------------------------------------------------------------------------- compare

def compare(report_dirs: Sequence[str], *, out: str | None = None, remeasure: bool = False,
            runs: Sequence[str] = (), device: str = "cpu", latency_batch: int | None = None,
            latency_repeats: int = 10, latency_warmup: int = 2, paired_ci: bool = False,
            reference: str | None = None) -> str:
    """The comparison as Markdown. With `out`, also write it there and the PNG plots next to it, and print each
    path written. `runs`: more training-run directories whose curves to plot (exported models do not record their
    run). `remeasure`: reload every model and time them side by side on `device`."""
    text, written = write_compare(report_dirs, out=out, remeasure=remeasure, runs=runs, device=device,
                                  latency_batch=latency_batch, latency_repeats=latency_repeats,
                                  latency_warmup=latency_warmup, paired_ci=paired_ci, reference=reference)
    for p in written:
        print(f"wrote {p}")
    return text


def _run_dirs(rows: Sequence[_Row], runs: Sequence[str]) -> dict[str, str]:
    """Legend name -> run directory: the runs among the models (by their row name), then `runs` (by directory name,
    made unique the same way)."""
    out = {r.label: r.model["provenance"]["run"] for r in rows if r.model["kind"] == "run"}
    known = {str(Path(d).resolve()) for d in out.values()}
    extra = [str(d) for d in runs if str(Path(d).resolve()) not in known]
    for name, d in zip(short_names([{"spec": str(Path(d).resolve()), "kind": "run"} for d in extra]), extra,
                       strict=True):
        out[name if name not in out else f"{name} (--run)"] = d
    return out


def _points(rows: Sequence[_Row], teacher: _Row | None, task: Task) -> list[plots.Point]:
    out = []
    for r in rows:
        note = ""
        if r is teacher:
            note = f"(teacher, {RANDOM})" if is_random_init(r.model) else "(teacher)"
        out.append(plots.Point(r.label, r.latency.get("ms_per_image_b1"), 100 * task.headline(r.model["metrics"]),
                               teacher=r is teacher, note=note))
    return out


def _correct(r: _Row) -> dict[str, bool] | None:
    """Per-image top-1 correctness of a row's model, by sample key (None when its report has no predictions)."""
    pred, samples = r.model["metrics"].get("predictions"), r.report.get("samples")
    if pred is None or not samples:
        return None
    return {k: p == y for k, p, y in zip(samples["keys"], pred, samples["labels"], strict=True)}


def paired_table(rows: Sequence[_Row], reference: _Row, *, resamples: int = 10_000) -> tuple[str, list[str]]:
    """Each model's top-1 minus the reference's on the same images, with a 95% paired-bootstrap CI over images and
    McNemar's exact p (kdcache.eval.metrics.paired_difference); images both reports scored, matched by key."""
    ref = _correct(reference)
    if ref is None:
        raise CompareError(f"--paired-ci: the reference {reference.label} has no per-image predictions (its report is "
                           "from an older kdcache or not zero-shot); re-run kdcache eval")
    out, notes = [], []
    for r in rows:
        if r is reference:
            continue
        mine = _correct(r)
        if mine is None:
            notes.append(f"{r.label}: no per-image predictions in its report; not in the paired table.")
            continue
        keys = [k for k in ref if k in mine]
        if not keys:
            notes.append(f"{r.label}: no image in common with the reference; not in the paired table.")
            continue
        d = M.paired_difference([mine[k] for k in keys], [ref[k] for k in keys], resamples=resamples)
        out.append([r.label, fmt_number(100 * d["diff"], digits=2), f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]",
                    f"{d['a_only']} / {d['b_only']}", f"{d['p_mcnemar']:.3g}", str(d["n"]),
                    "yes" if d["lo"] > 0 or d["hi"] < 0 else "no"])
    table = md_table(["model", f"Δ top-1 vs {reference.label} (pts)", "95% CI (paired bootstrap)",
                      "only it right / only ref right", "McNemar p", "images", "CI excludes 0"], out)
    return table, notes


def write_compare(report_dirs: Sequence[str], *, out: str | None = None, remeasure: bool = False,
                  runs: Sequence[str] = (), device: str = "cpu", latency_batch: int | None = None,
                  latency_repeats: int = 10, latency_warmup: int = 2, paired_ci: bool = False,
                  reference: str | None = None) -> tuple[str, list[Path]]:
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
    lines += ["", table, ""]
    if paired_ci:
        names = {r.label: r for r in rows}
        if reference is not None and reference not in names:
            raise CompareError(f"--reference {reference!r}: not a model of these reports ({', '.join(names)})")
        ref = names[reference] if reference is not None else (teacher or rows[0])
        ptable, pnotes = paired_table(rows, ref)
        notes += pnotes
        lines += [f"## Paired differences against {ref.label}", "", ptable, ""]
    lines += ["Models:", "", *(f"- {x}" for x in _model_list(rows, teacher)), "", "Notes:", "",
              *(f"- {n}" for n in table_notes + notes), ""]

    written: list[Path] = []
    if out is not None:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        lines += ["## Plots", ""]
        stem = out_path.with_suffix("")
        curves = Path(f"{stem}-training.png")
        acc = Path(f"{stem}-accuracy-latency.png")
        if plots.plot_training(_run_dirs(rows, runs), curves):
            written.append(curves)
            lines.append(f"![training curves]({curves.name})")
        else:
            lines.append("No training curves: no training run among the models (exports do not record their "
                         "run; pass it with --run RUN).")
        if plots.plot_accuracy_latency(_points(rows, teacher, task), acc, ylabel=task.headline_label):
            written.append(acc)
            lines.append(f"![accuracy vs latency]({acc.name})")
        lines.append("")
    text = "\n".join(lines)
    if out is not None:
        Path(out).write_text(text, encoding="utf-8")
        written.insert(0, Path(out))
    return text, written
