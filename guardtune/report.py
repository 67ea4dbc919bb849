"""The audit report: report.json read back and checked (schema, then counts that contradict each other), and
the self-contained HTML page a reviewer reads (inline SVG)."""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .errors import Issue, ReportError
from .provenance import sha256_json
from .schemas import pointer, schema_issues

REPORT_KIND = "guardtune-audit-report"


# ----------------------------------------------------------------------------------------------- the document

def validate_report(report: Any) -> list[Issue]:
    """Schema problems, then (if the shape is right) counts that contradict each other."""
    issues = schema_issues(report, "report", "report-schema")
    if issues:
        return issues
    for model, result in report["results"].items():
        if result is None:
            continue
        base = f"/results/{model}"
        entries = [(f"{base}/asr/{i}", e) for i, e in enumerate(result["asr"])]
        for category, rows in result["asr_by_category"].items():
            entries += [(f"{base}/asr_by_category/{pointer([category])[1:]}/{i}", e) for i, e in enumerate(rows)]
        for path, entry in entries:
            if entry["errors"] + entry["harmful"] > entry["n"]:
                issues.append(Issue(code="report-inconsistent", path=path, message=(
                    f"{path}: harmful ({entry['harmful']}) + errors ({entry['errors']}) exceed n ({entry['n']}). "
                    f"The audit that wrote this report miscounted; re-run `guardtune audit`.")))
        seen: set[int] = set()
        for i, entry in enumerate(result["asr"]):
            if entry["k"] in seen:
                issues.append(Issue(code="report-inconsistent", path=f"{base}/asr/{i}/k", message=(
                    f"k={entry['k']} appears twice in {base}/asr; each prefix length must have one entry.")))
            seen.add(entry["k"])
        refusal = result["over_refusal"]
        if refusal["errors"] + refusal["refusals"] > refusal["n"]:
            issues.append(Issue(code="report-inconsistent", path=f"{base}/over_refusal", message=(
                f"{base}/over_refusal: refusals + errors exceed n. Re-run `guardtune audit`.")))
        kl = result["kl_profile"]
        if kl is not None and len(kl["positions"]) != len(kl["mean_kl"]):
            issues.append(Issue(code="report-inconsistent", path=f"{base}/kl_profile", message=(
                f"{base}/kl_profile has {len(kl['positions'])} positions but {len(kl['mean_kl'])} mean_kl values; "
                f"they must pair up.")))
    return issues


def find_report(path: str | Path) -> Path:
    """`path` itself, or report.json / audit/report.json inside a directory."""
    path = Path(path)
    if not path.is_dir():
        return path
    candidates = [path / "report.json", path / "audit" / "report.json"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ReportError(f"No report.json in {path} (looked at {', '.join(map(str, candidates))}). "
                          f"Pass the report file that `guardtune audit` wrote.")
    return found


def load_report(path: str | Path) -> dict[str, Any]:
    """Read and validate report.json (a file, or a directory holding report.json or audit/report.json)."""
    path = find_report(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"Report {path} does not exist. Pass the report.json written by `guardtune audit`.")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"Cannot read report {path}: {exc}. It must be UTF-8 JSON written by `guardtune audit`.")
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"Report {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
                          f"Re-run `guardtune audit` or restore the file.")
    issues = validate_report(report)
    if issues:
        lines = "\n".join(f"  - {issue.path}: {issue.message}" for issue in issues)
        raise ReportError(f"Report {path} is invalid ({len(issues)} problem(s)):\n{lines}", issues)
    return report


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """samples.jsonl as a list; unreadable lines are skipped (they are display-only)."""
    samples = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                samples.append(record)
    return samples


# ----------------------------------------------------------------------------------------------- HTML

def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _pct(rate: float | None, digits: int = 1) -> str:
    return "n/a" if rate is None else f"{100 * rate:.{digits}f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"[{_pct(ci[0], 0)}, {_pct(ci[1], 0)}]"


def _by_k(result: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    return {} if result is None else {entry["k"]: entry for entry in result["asr"]}


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2937;margin:0;background:#f8fafc}
main{max-width:1080px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.sub{color:#6b7280;font-size:13px}
.banner{padding:10px 14px;border-radius:6px;margin:12px 0;font-weight:600}
.pass{background:#dcfce7;color:#166534;border:1px solid #86efac}
.reject{background:#fee2e2;color:#991b1b;border:1px solid #fca5a5}
.none{background:#e5e7eb;color:#374151}
.note{background:#fef9c3;color:#713f12;border:1px solid #fde047;font-weight:500}
.warn{background:#ffedd5;color:#9a3412;border:1px solid #fdba74;font-weight:500}
table{border-collapse:collapse;margin:6px 0;background:#fff;font-size:14px}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f1f5f9}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.up{background:#fee2e2;color:#991b1b;font-weight:600}td.down{color:#166534}
td.ok{color:#166534;font-weight:600}td.bad{color:#991b1b;font-weight:700}
.charts{display:flex;flex-wrap:wrap;gap:16px}.chart{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:8px}
svg text{font:12px system-ui,sans-serif;fill:#374151}
details{background:#fff;border:1px solid #e5e7eb;border-radius:6px;margin:6px 0;padding:6px 10px}
summary{cursor:pointer;font-weight:600}
.sample{border-top:1px solid #f1f5f9;padding:8px 0}
.instr{font-weight:600;margin:2px 0}
.resp{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;background:#f8fafc;padding:6px}
.prefix{background:#fde68a;border-bottom:2px solid #d97706}
.tag{display:inline-block;padding:0 6px;border-radius:4px;font-size:12px;font-weight:600}
.tag.harmful,.tag.error{background:#fee2e2;color:#991b1b}.tag.refusal{background:#dbeafe;color:#1e40af}
.tag.safe{background:#dcfce7;color:#166534}
pre{background:#fff;border:1px solid #e5e7eb;padding:8px;overflow:auto;font-size:12px}
"""

BASE_COLOR, FT_COLOR, LIMIT_COLOR = "#6b7280", "#2563eb", "#dc2626"


def _svg_open(width: int, height: int, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}"><title>{_e(label)}</title>')


def _legend(x: float, y: float, items: list[tuple[str, str, bool]]) -> str:
    parts = []
    for i, (name, color, dashed) in enumerate(items):
        yy = y + 16 * i
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        parts.append(f'<line x1="{x}" y1="{yy}" x2="{x + 18}" y2="{yy}" stroke="{color}" stroke-width="2"{dash}/>'
                     f'<text x="{x + 24}" y="{yy + 4}">{_e(name)}</text>')
    return "".join(parts)


def asr_chart(report: dict[str, Any], limits: dict[int, float] | None = None) -> str:
    """ASR vs prefix length k, base and fine-tuned, with 95% Wilson error bars and gate limits if known."""
    base, tuned = _by_k(report["results"]["base"]), _by_k(report["results"]["finetuned"])
    ks = sorted(set(base) | set(tuned))
    width, height, left, right, top, bottom = 520, 300, 48, 150, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    # k values are 0/5/10/20/40: equal spacing per audited k reads better than a linear axis.
    step = plot_w / max(len(ks), 1)
    x_of = {k: left + step * (i + 0.5) for i, k in enumerate(ks)}

    def y(rate: float) -> float:
        return top + plot_h * (1 - rate)

    out = [_svg_open(width, height, "Attack success rate vs prefilled tokens k")]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left}" y1="{y(tick):.1f}" x2="{left + plot_w}" y2="{y(tick):.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{int(tick * 100)}%</text>')
    for k in ks:
        out.append(f'<text x="{x_of[k]:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{k}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">prefilled harmful tokens k</text>')
    for k, limit in sorted((limits or {}).items()):
        if k in x_of:
            out.append(f'<line x1="{x_of[k] - step / 3:.1f}" y1="{y(limit):.1f}" x2="{x_of[k] + step / 3:.1f}" '
                       f'y2="{y(limit):.1f}" stroke="{LIMIT_COLOR}" stroke-width="2" stroke-dasharray="3 2">'
                       f'<title>gate limit at k={k}: {_pct(limit)}</title></line>')
    for name, series, color, offset, dashed in (("base", base, BASE_COLOR, -5, True),
                                                 ("fine-tuned", tuned, FT_COLOR, 5, False)):
        points = [(x_of[k] + offset, series[k]) for k in ks if k in series]
        if not points:
            continue
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        path = " ".join(f"{px:.1f},{y(e['rate']):.1f}" for px, e in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for px, entry in points:
            lo, hi = entry["ci95"]
            out.append(f'<line x1="{px:.1f}" y1="{y(lo):.1f}" x2="{px:.1f}" y2="{y(hi):.1f}" stroke="{color}"/>'
                       f'<line x1="{px - 3:.1f}" y1="{y(lo):.1f}" x2="{px + 3:.1f}" y2="{y(lo):.1f}" stroke="{color}"/>'
                       f'<line x1="{px - 3:.1f}" y1="{y(hi):.1f}" x2="{px + 3:.1f}" y2="{y(hi):.1f}" stroke="{color}"/>'
                       f'<circle cx="{px:.1f}" cy="{y(entry["rate"]):.1f}" r="3.5" fill="{color}">'
                       f'<title>{_e(name)} k={entry["k"]}: {_pct(entry["rate"])} ({entry["harmful"]}/'
                       f'{entry["n"] - entry["errors"]}) 95% CI {_ci(entry["ci95"])}</title></circle>')
    legend = [("base", BASE_COLOR, True), ("fine-tuned", FT_COLOR, False)]
    if limits:
        legend.append(("gate limit", LIMIT_COLOR, True))
    out.append(_legend(left + plot_w + 16, top + 10, legend))
    out.append("</svg>")
    return "".join(out)


def kl_chart(report: dict[str, Any], limit: float | None = None) -> str:
    """Per-token KL(fine-tuned || base) against response position; the base is 0 by definition."""
    tuned = report["results"]["finetuned"]
    profile = tuned["kl_profile"] if tuned else None
    if not profile or not profile["positions"]:
        return '<p class="sub">No KL profile in this report (base-only audit, or the audit skipped it).</p>'
    positions, values = profile["positions"], profile["mean_kl"]
    width, height, left, right, top, bottom = 520, 300, 56, 150, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = max([*values, limit or 0.0, 1e-6]) * 1.1
    x_lo, x_hi = min(positions), max(max(positions), min(positions) + 1)

    def x(position: float) -> float:
        return left + plot_w * (position - x_lo) / (x_hi - x_lo)

    def y(value: float) -> float:
        return top + plot_h * (1 - max(value, 0.0) / y_max)

    out = [_svg_open(width, height, "Per-token KL(fine-tuned || base) vs response position")]
    band_end = x(min(5.5, x_hi)) if x_hi > x_lo else x(x_hi)
    out.append(f'<rect x="{left}" y="{top}" width="{max(band_end - left, 0):.1f}" height="{plot_h}" fill="#eff6ff">'
               f'<title>positions 1-5: where shallow alignment lives</title></rect>')
    for i in range(5):
        tick = y_max * i / 4
        out.append(f'<line x1="{left}" y1="{y(tick):.1f}" x2="{left + plot_w}" y2="{y(tick):.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.2g}</text>')
    ticks = sorted({x_lo, *range(5, int(x_hi) + 1, 5)})
    if x_hi - ticks[-1] >= 3:  # label the last position unless it would collide with the previous tick
        ticks.append(int(x_hi))
    for position in ticks:
        out.append(f'<text x="{x(position):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{position}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">response token position'
               f'</text><text x="12" y="{top + plot_h / 2:.1f}" transform="rotate(-90 12 {top + plot_h / 2:.1f})" '
               f'text-anchor="middle">KL (nats)</text>')
    out.append(f'<line x1="{left}" y1="{y(0):.1f}" x2="{left + plot_w}" y2="{y(0):.1f}" stroke="{BASE_COLOR}" '
               f'stroke-width="2" stroke-dasharray="5 3"/>')
    if limit is not None:
        out.append(f'<line x1="{x(x_lo):.1f}" y1="{y(limit):.1f}" x2="{x(min(5, x_hi)):.1f}" y2="{y(limit):.1f}" '
                   f'stroke="{LIMIT_COLOR}" stroke-width="2" stroke-dasharray="3 2"><title>gate limit on the mean '
                   f'of positions 1-5: {limit:g}</title></line>')
    path = " ".join(f"{x(p):.1f},{y(v):.1f}" for p, v in zip(positions, values))
    out.append(f'<polyline points="{path}" fill="none" stroke="{FT_COLOR}" stroke-width="2"/>')
    for p, v in zip(positions, values):
        out.append(f'<circle cx="{x(p):.1f}" cy="{y(v):.1f}" r="2.5" fill="{FT_COLOR}"><title>position {p}: '
                   f'{v:.4g}</title></circle>')
    legend = [("fine-tuned", FT_COLOR, False), ("base (0)", BASE_COLOR, True)]
    if limit is not None:
        legend.append(("gate limit", LIMIT_COLOR, True))
    out.append(_legend(left + plot_w + 16, top + 10, legend))
    out.append("</svg>")
    return "".join(out)


SERIES_COLORS = ("#6b7280", "#f59e0b", "#2563eb", "#16a34a", "#dc2626", "#7c3aed")


def line_chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], x_label: str, y_label: str,
               *, percent: bool = False, categorical_x: bool = False, width: int = 560, height: int = 300) -> str:
    """A standalone SVG line chart of several named series [(x, y), ...], for docs and comparisons (the
    reproduction's KL-per-position and ASR-per-k plots, the objective study's per-step traces).
    `percent` draws y in [0, 1] as %; `categorical_x` spaces the distinct x values evenly (k = 0/5/10/20)."""
    left, right, top, bottom = 56, 150, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = sorted({x for _, points in series for x, _ in points})
    ys = [y for _, points in series for _, y in points]
    y_max = 1.0 if percent else max([*ys, 1e-6]) * 1.1
    if categorical_x:
        step = plot_w / max(len(xs), 1)
        x_pos = {x: left + step * (i + 0.5) for i, x in enumerate(xs)}

        def px(x: float) -> float:
            return x_pos[x]
    else:
        lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1

        def px(x: float) -> float:
            return left + plot_w * (x - lo) / (hi - lo)

    def py(y: float) -> float:
        return top + plot_h * (1 - max(min(y, y_max), 0.0) / y_max)

    out = [_svg_open(width, height, title), '<style>text{font:11px sans-serif;fill:#374151}</style>',
           '<rect width="100%" height="100%" fill="#fff"/>']
    for i in range(5):
        tick = y_max * i / 4
        label = f"{tick:.0%}" if percent else f"{tick:.2g}"
        out.append(f'<line x1="{left}" y1="{py(tick):.1f}" x2="{left + plot_w}" y2="{py(tick):.1f}" '
                   f'stroke="#e5e7eb"/><text x="{left - 6}" y="{py(tick) + 4:.1f}" text-anchor="end">{label}</text>')
    labelled = xs if categorical_x or len(xs) <= 12 else sorted({xs[0], xs[-1], *xs[::max(len(xs) // 8, 1)]})
    for x in labelled:
        out.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">{_e(x_label)}</text>'
               f'<text x="12" y="{top + plot_h / 2:.1f}" transform="rotate(-90 12 {top + plot_h / 2:.1f})" '
               f'text-anchor="middle">{_e(y_label)}</text>')
    legend = []
    for i, (name, points) in enumerate(series):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(points))
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in points:
            value = f"{y:.1%}" if percent else f"{y:.4g}"
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"><title>{_e(name)} '
                       f'{x:g}: {value}</title></circle>')
        legend.append((name, color, False))
    out.append(_legend(left + plot_w + 16, top + 10, legend))
    out.append("</svg>")
    return "".join(out)


def over_refusal_chart(report: dict[str, Any]) -> str:
    """Over-refusal on benign probes, base vs fine-tuned, as bars with 95% Wilson whiskers."""
    rows = [(name, report["results"][key]["over_refusal"], color)
            for name, key, color in (("base", "base", BASE_COLOR), ("fine-tuned", "finetuned", FT_COLOR))
            if report["results"][key] is not None]
    width, left, right, bar_h = 520, 90, 30, 22
    height = 30 + len(rows) * 36
    plot_w = width - left - right

    def x(rate: float) -> float:
        return left + plot_w * rate

    out = [_svg_open(width, height, "Over-refusal on benign probes")]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{x(tick):.1f}" y1="4" x2="{x(tick):.1f}" y2="{height - 20}" stroke="#e5e7eb"/>'
                   f'<text x="{x(tick):.1f}" y="{height - 6}" text-anchor="middle">{int(tick * 100)}%</text>')
    for i, (name, entry, color) in enumerate(rows):
        top = 8 + i * 36
        lo, hi = entry["ci95"]
        mid = top + bar_h / 2
        out.append(f'<text x="{left - 8}" y="{mid + 4:.1f}" text-anchor="end">{_e(name)}</text>'
                   f'<rect x="{left}" y="{top}" width="{x(entry["rate"]) - left:.1f}" height="{bar_h}" fill="{color}" '
                   f'opacity="0.8"><title>{_e(name)}: {_pct(entry["rate"])} ({entry["refusals"]}/'
                   f'{entry["n"] - entry["errors"]}) 95% CI {_ci(entry["ci95"])}</title></rect>'
                   f'<line x1="{x(lo):.1f}" y1="{mid:.1f}" x2="{x(hi):.1f}" y2="{mid:.1f}" stroke="#111827"/>'
                   f'<line x1="{x(lo):.1f}" y1="{mid - 5:.1f}" x2="{x(lo):.1f}" y2="{mid + 5:.1f}" stroke="#111827"/>'
                   f'<line x1="{x(hi):.1f}" y1="{mid - 5:.1f}" x2="{x(hi):.1f}" y2="{mid + 5:.1f}" stroke="#111827"/>')
    out.append("</svg>")
    return "".join(out)


def _category_names() -> dict[str, str]:
    try:  # evalsets is torch-free; fall back to bare codes if it is unavailable
        from .evalsets import HAZARD_CATEGORIES

        return dict(HAZARD_CATEGORIES)
    except Exception:
        return {}


def _headline(report: dict[str, Any]) -> str:
    base, tuned = report["results"]["base"], report["results"]["finetuned"]
    base_k, tuned_k = _by_k(base), _by_k(tuned)
    rows = []
    for k in sorted(set(base_k) | set(tuned_k)):
        b, t = base_k.get(k), tuned_k.get(k)
        rows.append(_compare_row(f"ASR at k={k}", b, t, "harmful"))
    rows.append(_compare_row("Over-refusal (benign)", base["over_refusal"],
                             tuned["over_refusal"] if tuned else None, "refusals"))
    if base.get("utility"):
        rows.append(_compare_row("Utility (factual probe accuracy)", base["utility"],
                                 tuned.get("utility") if tuned else None, "correct", higher_is_better=True))
    if tuned and tuned["kl_profile"]:
        kl = tuned["kl_profile"]
        rows.append(f'<tr><td>Mean KL at tokens 1-5 (nats)</td><td class="num">0</td>'
                    f'<td class="num">{kl["mean_first5"]:.4g}</td><td class="num"></td></tr>')
    for name, result in (("base", base), ("fine-tuned", tuned)):
        if result:
            je = result["judge_errors"]
            cls = "up" if je["errors"] else ""
            rows.append(f'<tr><td>Judge errors ({name})</td><td colspan="3" class="num {cls}">{je["errors"]} of '
                        f'{je["samples"]} samples unscorable</td></tr>')
    return ('<table><tr><th>metric</th><th>base</th><th>fine-tuned</th><th>change</th></tr>'
            + "".join(rows) + "</table>")


def _compare_row(label: str, base: dict | None, tuned: dict | None, count_key: str,
                 higher_is_better: bool = False) -> str:
    def cell(entry: dict | None) -> str:
        if entry is None:
            return '<td class="num">n/a</td>'
        scored = entry["n"] - entry.get("errors", 0)
        return (f'<td class="num">{_pct(entry["rate"])} ({entry[count_key]}/{scored}) '
                f'<span class="sub">{_ci(entry["ci95"])}</span></td>')

    change = ""
    cls = ""
    if base is not None and tuned is not None:
        delta = tuned["rate"] - base["rate"]
        change = f"{'+' if delta >= 0 else ''}{100 * delta:.1f} pts"
        worse = -delta if higher_is_better else delta
        cls = "up" if worse > 1e-12 else "down" if worse < -1e-12 else ""
    return f'<tr><td>{_e(label)}</td>{cell(base)}{cell(tuned)}<td class="num {cls}">{change}</td></tr>'


def _category_table(report: dict[str, Any]) -> str:
    base, tuned = report["results"]["base"], report["results"]["finetuned"]
    names = _category_names()
    categories = sorted(set(base["asr_by_category"]) | set(tuned["asr_by_category"] if tuned else {}),
                        key=lambda c: (len(c), c))
    if not categories:
        return '<p class="sub">No per-category results.</p>'
    ks = sorted({e["k"] for rows in base["asr_by_category"].values() for e in rows} |
                {e["k"] for rows in (tuned["asr_by_category"].values() if tuned else []) for e in rows})
    head = "".join(f"<th>k={k}<br><span class='sub'>base → fine-tuned</span></th>" for k in ks)
    body = []
    for category in categories:
        b = {e["k"]: e for e in base["asr_by_category"].get(category, [])}
        t = {e["k"]: e for e in (tuned["asr_by_category"].get(category, []) if tuned else [])}
        n = max([e["n"] for e in [*b.values(), *t.values()]] or [0])
        cells = []
        for k in ks:
            bb, tt = b.get(k), t.get(k)
            up = bb is not None and tt is not None and tt["rate"] > bb["rate"] + 1e-12
            cells.append(f'<td class="num{" up" if up else ""}">{_pct(bb["rate"], 0) if bb else "n/a"} → '
                         f'{_pct(tt["rate"], 0) if tt else "n/a"}</td>')
        label = f"{category} {names.get(category, '')}".strip()
        body.append(f'<tr><td>{_e(label)}</td><td class="num">{n}</td>{"".join(cells)}</tr>')
    return (f'<table><tr><th>category</th><th>n</th>{head}</tr>{"".join(body)}</table>'
            f'<p class="sub">Red cells: the fine-tuned model is attacked more successfully than the base. Categories '
            f'hold few prompts in a sampled audit; read small differences as noise.</p>')


def _gate_section(decision: dict[str, Any] | None) -> str:
    if decision is None:
        return '<p class="sub">No gate.json beside this report: run <code>guardtune gate</code> to decide.</p>'
    rows = []
    for rule in decision.get("rules", []):
        where = ", ".join(x for x in (f"k={rule['k']}" if rule.get("k") is not None else "",
                                      rule.get("category") or "", rule.get("model") or "") if x)
        value = "missing" if rule.get("value") is None else f"{rule['value']:.4g}"
        verdict = '<td class="ok">pass</td>' if rule.get("passed") else '<td class="bad">FAIL</td>'
        rows.append(f'<tr><td>{_e(rule.get("rule"))}</td><td>{_e(where)}</td><td class="num">{_e(value)}</td>'
                    f'<td class="num">{_e(rule.get("limit"))}</td>{verdict}<td>{_e(rule.get("reason"))}</td></tr>')
    policy = decision.get("policy", {})
    return (f'<p>Policy <b>{_e(policy.get("name"))}</b> v{_e(policy.get("version"))} '
            f'<span class="sub">sha256 {_e(str(policy.get("sha256", ""))[:16])}…, decided {_e(decision.get("decided_at"))}'
            f'</span></p><table><tr><th>rule</th><th>where</th><th>value</th><th>limit</th><th>result</th>'
            f'<th>reason</th></tr>{"".join(rows)}</table>')


def _provenance(report: dict[str, Any]) -> str:
    model, adapter, judge = report["model"], report["adapter"], report["judge"]
    prefix, sample, prov = report["prefix_source"], report["sample"], report["provenance"]
    rows = [
        ("base model", f"{model['spec']} ({model['kind']}, revision {model['revision'] or '-'}, "
                       f"{model['dtype']}, quantization {model['quantization']})"),
        ("base weights sha256", model["weights_sha256"]),
        ("adapter", f"{adapter['path']}  sha256 {adapter['sha256']}" if adapter else "none (base-only audit)"),
        ("judge", ", ".join(f"{k}={v}" for k, v in judge.items())),
        ("prefix source", f"{prefix['kind']}, {prefix['tokens']} tokens"
                          + (f", model {prefix['model']}" if prefix.get("model") else "")
                          + (f" (sha256 {prefix['model_sha256']})" if prefix.get("model_sha256") else "")
                          + (f" — {prefix['note']}" if prefix.get("note") else "")),
        ("sample", f"{sample['harmful']} of {sample['harmful_total']} harmful prompts, {sample['benign']} of "
                   f"{sample['benign_total']} benign probes, seed {sample['seed']}, "
                   f"{sample['max_new_tokens']} new tokens"),
        ("created", report["created_at"]),
    ]
    rows += [(key, json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value)
             for key, value in prov.items()]
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    config = json.dumps(report["config"], indent=2, ensure_ascii=False, sort_keys=True)
    return (f"<table>{table}</table><details><summary>Audit configuration</summary><pre>{_e(config)}</pre>"
            f"</details>")


def _verdict_tag(verdict: dict[str, Any] | None) -> str:
    verdict = verdict or {}
    if verdict.get("error"):
        return f'<span class="tag error">judge error: {_e(verdict["error"])}</span>'
    if verdict.get("harmful"):
        return '<span class="tag harmful">harmful</span>'
    if verdict.get("refusal"):
        return '<span class="tag refusal">refusal</span>'
    return '<span class="tag safe">not harmful</span>'


def _sample_card(sample: dict[str, Any]) -> str:
    prefix = sample.get("prefix") or ""
    prefix_html = f'<span class="prefix" title="prefilled by the attack">{_e(prefix)}</span>' if prefix else ""
    return (f'<div class="sample"><div class="sub">{_e(sample.get("id"))} · {_e(sample.get("category"))} · '
            f'{_verdict_tag(sample.get("verdict"))}</div><div class="instr">{_e(sample.get("instruction"))}</div>'
            f'<div class="resp">{prefix_html}{_e(sample.get("continuation"))}</div></div>')


def _rank(sample: dict[str, Any]) -> int:
    verdict = sample.get("verdict") or {}
    return 0 if verdict.get("harmful") else 1 if verdict.get("error") else 2


def _sample_group(title: str, members: list[dict[str, Any]], cap: int) -> str:
    ordered = sorted(members, key=_rank)  # harmful first, then judge errors: what a reviewer must see
    shown = "".join(_sample_card(s) for s in ordered[:cap])
    rest = len(ordered) - cap
    more = f'<p class="sub">… and {rest} more not shown (see samples.jsonl).</p>' if rest > 0 else ""
    return f"<details><summary>{_e(title)}</summary>{shown}{more}</details>"


def _samples_section(samples: list[dict[str, Any]], cap: int) -> str:
    if not samples:
        return '<p class="sub">No samples.jsonl beside this report.</p>'
    harmful: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    benign: dict[str, list] = defaultdict(list)
    for sample in samples:
        if sample.get("set") == "benign":
            benign[str(sample.get("model"))].append(sample)
        else:
            harmful[sample.get("k") if isinstance(sample.get("k"), int) else -1][str(sample.get("model"))].append(sample)
    parts = ['<p class="sub">Harmful continuations are collapsed; the <span class="prefix">highlighted</span> text is '
             'the prefilled attack prefix, the rest is what the model wrote.</p>']
    for k in sorted(harmful):
        parts.append(f"<h3>Prefilling attack, k = {k}</h3>")
        for model in sorted(harmful[k]):
            members = harmful[k][model]
            n_harmful = sum(1 for s in members if (s.get("verdict") or {}).get("harmful"))
            parts.append(_sample_group(f"{model}: {n_harmful} of {len(members)} harmful", members, cap))
    if benign:
        parts.append("<h3>Over-refusal probes (benign)</h3>")
        for model in sorted(benign):
            members = benign[model]
            refused = sum(1 for s in members if (s.get("verdict") or {}).get("refusal"))
            parts.append(_sample_group(f"{model}: {refused} of {len(members)} refused", members, cap))
    return "".join(parts)


def _gate_limits(decision: dict[str, Any] | None, rule: str) -> dict[Any, float]:
    return {r.get("k"): r["limit"] for r in (decision or {}).get("rules", []) if r.get("rule") == rule}


def render_html(report: dict[str, Any], samples: Iterable[dict[str, Any]] | None = None,
                decision: dict[str, Any] | None = None, *, max_samples_per_group: int = 50) -> str:
    """One self-contained HTML page (no scripts, no external assets); every report string is escaped."""
    samples = list(samples or [])
    tuned = report["results"]["finetuned"]
    title = f"guardtune audit — {report['model']['spec']}" + (" + adapter" if report["adapter"] else "")
    head = [f"<h1>{_e(title)}</h1><div class='sub'>report created {_e(report['created_at'])}</div>"]
    if report["sample"]["note"]:
        head.append(f'<div class="banner note">{_e(report["sample"]["note"])}</div>')
    if decision is None:
        head.append('<div class="banner none">Not gated yet: no gate.json beside this report.</div>')
    else:
        failed = [r for r in decision.get("rules", []) if not r.get("passed")]
        verdict = decision.get("verdict", "reject")
        policy = decision.get("policy", {})
        text = (f"Gate verdict: {verdict.upper()} under policy {policy.get('name')} v{policy.get('version')} — "
                f"{len(failed)} of {len(decision.get('rules', []))} rules failed")
        head.append(f'<div class="banner {"pass" if verdict == "pass" else "reject"}">{_e(text)}</div>')
        if failed:
            more = (f"<li>… and {len(failed) - 8} more (see Gate decision below)</li>" if len(failed) > 8 else "")
            head.append("<ul>" + "".join(f"<li>{_e(r.get('reason'))}</li>" for r in failed[:8]) + more + "</ul>")
        if decision.get("report_sha256") and decision["report_sha256"] != sha256_json(report):
            head.append('<div class="banner warn">This gate decision was made on a different report.json (hashes '
                        'differ); re-run <code>guardtune gate</code> on this report.</div>')
    if tuned is None:
        head.append('<div class="banner warn">Base-only audit: no fine-tuned results to compare.</div>')
    kl_limit = _gate_limits(decision, "max_kl_first5").get(None)
    body = [
        "<h2>Headline</h2>", _headline(report),
        "<h2>Prefilling attack and alignment depth</h2>",
        '<p class="sub">Attack success rate when the first k tokens of a harmful answer are forced (error bars: 95% '
        'Wilson intervals), and how far the fine-tuned model moved from the base at each response token.</p>',
        f'<div class="charts"><div class="chart">{asr_chart(report, _gate_limits(decision, "max_asr"))}</div>'
        f'<div class="chart">{kl_chart(report, kl_limit)}</div></div>',
        "<h2>Per category</h2>", _category_table(report),
        "<h2>Over-refusal</h2>", f'<div class="chart">{over_refusal_chart(report)}</div>',
        "<h2>Gate decision</h2>", _gate_section(decision),
        "<h2>Provenance</h2>", _provenance(report),
        "<h2>Samples</h2>", _samples_section(samples, max_samples_per_group),
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            + "".join(head) + "".join(body) + "</main></body></html>\n")


def write_html(audit_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render report.html from audit_dir/report.json (+ samples.jsonl, and gate.json here or one level up)."""
    report_path = find_report(audit_dir)
    folder = report_path.parent
    report = load_report(report_path)
    samples_path = folder / "samples.jsonl"
    samples = read_samples(samples_path) if samples_path.is_file() else None
    decision = None
    for candidate in (folder / "gate.json", folder.parent / "gate.json"):
        if candidate.is_file():
            try:
                decision = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ReportError(f"{candidate} is not readable JSON ({exc}). Re-run `guardtune gate` to rewrite it "
                                  f"or delete it.")
            break
    out_path = Path(out) if out is not None else folder / "report.html"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render_html(report, samples, decision), encoding="utf-8")
    return out_path
