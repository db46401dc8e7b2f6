"""The report of `kdcache eval` as Markdown, and the table helpers `kdcache compare` shares.

    text = render_markdown(json.loads(Path("reports/cifar10/report.json").read_text()), get_task("zeroshot"))
    md_table(["model", "top-1"], [["student", fmt_number(0.912, pct=True)]])

report.md is rendered from report.json's dict alone, so it can be re-rendered from a report on disk. The sections
common to every task are here; each task (`kdcache.eval.tasks`) renders its own summary line, metrics table and
details.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdcache.eval.tasks import Task

REPORT_JSON = "report.json"
REPORT_MD = "report.md"

CONVENTIONS = [
    "Precision/recall/F1 of a class are 0 when undefined (never predicted / no true sample), as scikit-learn's "
    "zero_division=0. Macro averages run over the classes present in the labels or the predictions; weighted "
    "averages weight classes by support.",
    "Top-5 is omitted (–) when there are 5 classes or fewer: every sample would be a hit.",
    "Retrieval: a retrieved caption is a hit when its text equals the query image's caption, and a retrieved image is "
    "a hit when its caption text equals the query caption (captions repeat: templated captions, COCO "
    "near-duplicates); the gallery keeps every sample, ties count as hits.",
    "Agreement: top-1 agreement = fraction of samples whose predicted class equals the teacher's; cosine = mean "
    "cosine between the model's and the teacher's embedding of the same sample (same embedding space only); "
    "KL = mean KL(p_teacher ‖ p_model) of the class distributions at T=1, in nats.",
    "Sizes in MB = 10^6 bytes of the checkpoint file(s); latency is the image tower's forward pass on a random "
    "normalised tensor at the model's own input size (no decoding), median over repeats.",
]


def fmt_number(v, *, pct: bool = False, digits: int = 2, suffix: str = "") -> str:
    """A table cell: "–" for missing, percentages from fractions, thousands separators for ints, and scientific
    notation for small non-zero floats (a KL of 0.002 should not print as 0.00)."""
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.{digits}f}{suffix}"
    if isinstance(v, int):
        return f"{v:,}{suffix}"
    return (f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}") + suffix


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one character per column (l, r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _spec_parts(m: dict) -> list[str]:
    """The components of a report entry's spec, most specific last: a path's parts, an hf-hub repo's parts, or the
    open_clip name alone."""
    spec = ((m.get("reload") or {}).get("spec") or m["spec"]).rstrip("/")
    for prefix in ("local-dir:", "hf-hub:"):
        spec = spec.removeprefix(prefix)
    parts = [x for x in spec.replace("\\", "/").split("/") if x]
    if parts and parts[-1].lower().endswith(".json"):
        parts[-1] = parts[-1][:-5]
    return parts or [m["spec"]]


def short_name(m: dict, *, depth: int = 1) -> str:
    """A report entry's short name: its directory's name (export, run, local-dir), its config file's stem, or its
    open_clip name, plus its --pretrained file or tag; `depth` > 1 keeps that many trailing path components, to tell
    apart models whose last components are equal."""
    name = "/".join(_spec_parts(m)[-depth:])
    pretrained = (m.get("reload") or {}).get("pretrained")
    return f"{name} ({Path(pretrained).name})" if pretrained else name


def short_names(models: Sequence[dict], *, contexts: Sequence[str] | None = None) -> list[str]:
    """Unique short names for these report entries: `short_name`, with more of the path where two are equal, then the
    entry's context (e.g. its report directory's name) in brackets, then a #n counter."""
    depth = [1] * len(models)
    deepest = [len(_spec_parts(m)) for m in models]
    full = [short_name(m, depth=d) for m, d in zip(models, deepest, strict=True)]

    def names() -> list[str]:
        return [short_name(m, depth=d) for m, d in zip(models, depth, strict=True)]

    while True:
        cur = names()
        # More of the path only where it can help: a name shared with a model from another path.
        grow = [i for i, n in enumerate(cur) if depth[i] < deepest[i]
                and any(j != i and x == n and full[j] != full[i] for j, x in enumerate(cur))]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    cur = names()
    if contexts is not None:
        cur = [f"{n} [{c}]" if cur.count(n) > 1 else n for n, c in zip(cur, contexts, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for n in cur:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if cur.count(n) == 1 else f"{n} #{seen[n]}")
    return out


def model_name(m: dict) -> str:
    """A report entry's name in a table: the teacher in bold, so the reference row stands out."""
    return f"**{m['label']}** (teacher)" if m["is_teacher"] else m["label"]


def render_markdown(report: dict, task: Task) -> str:
    """report.md from report.json's dict; `task` is the report's task (get_task(report["task"]))."""
    d = report["data"]
    out = [f"# kdcache eval: {report['task']}", ""]
    skipped = ", ".join(f"{k} {v}" for k, v in {**d["rejected"], **d["skipped"]}.items()) or "none"
    out.append(f"- data: {', '.join(d['patterns'])} — {d['shards']} shard(s), **{d['samples']} samples** "
               f"(rejected/skipped: {skipped}{'; --limit ' + str(d['limit']) if d['limit'] else ''})")
    if d.get("subset"):
        out.append(f"- subset: {d['subset']['described']} ({d['subset']['filtered_out']} samples left out)")
    out.append(task.summary_line(report))
    t = report.get("teacher")
    out.append(f"- teacher: {t if t else 'none among the models'}")
    out.append(f"- kdcache {report['kdcache_version']}, {report['created']}")
    out.append("")

    out += [*task.metrics_section(report), ""]
    out += [*_agreement_section(report, task), ""]
    out += [*_efficiency_section(report), ""]
    out += task.detail_sections(report)
    if report["notes"]:
        out += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    out += ["## Definitions", "", *(f"- {c}" for c in CONVENTIONS), ""]
    return "\n".join(out)


def _agreement_section(report: dict, task: Task) -> list[str]:
    a = report["agreement"]
    out = ["## Agreement with the teacher", ""]
    if not a["available"]:
        out.append(f"Unavailable: {a['reason']}")
        return out
    out.append(f"Reference: {a['reference']}." + (f" {a['reason']}" if a.get("reason") else ""))
    out.append("")
    rows = []
    for m in report["models"]:
        g = m.get("agreement")
        if g is None:
            continue
        rows.append([m["label"], fmt_number(g.get("top1_agreement"), pct=True), fmt_number(g.get("cosine"), digits=4),
                     fmt_number(g.get("kl"), digits=4),
                     *(fmt_number(g.get(key), digits=4) for _, key in task.agreement_columns)])
    header = ["model", "top-1 agreement (%)", "image cosine", "KL(teacher‖model)",
              *(h for h, _ in task.agreement_columns)]
    out.append(md_table(header, rows) if rows else "No model besides the reference.")
    return out


def _efficiency_section(report: dict) -> list[str]:
    tm, models = report["timing"], report["models"]
    out = ["## Efficiency", "",
           f"Device: {tm['device']}; " + ("timed side by side in one process, interleaved" if tm["side_by_side"]
                                          else "one model timed") +
           f", {tm['warmup']} warm-up + {tm['repeats']} timed calls per model and batch size, medians.", ""]
    rows = [[model_name(m), fmt_number(m["image_params"]), fmt_number(m["total_params"]), fmt_number(m["size_mb"]),
             fmt_number(m["latency"]["ms_per_image_b1"]), fmt_number(m["latency"]["images_per_s"], digits=1)]
            for m in models]
    out.append(md_table(["model", "image params", "total params", "MB", "ms/img (batch 1)",
                         f"img/s (batch {tm['batch']})"], rows))
    notes = [f"{m['label']}: {m['size_source']}" for m in models if m["size_source"] != "checkpoint file on disk"]
    if notes:
        out += ["", *(f"- {n}" for n in notes)]
    return out
