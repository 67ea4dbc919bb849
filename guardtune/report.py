"""The audit report: report.json read back and checked (schema, then counts that contradict each other), and
the self-contained HTML page a reviewer reads (inline SVG)."""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .errors import Issue, ReportError
from .evalsets import HAZARD_CATEGORIES
from .judges import wilson_interval
from .provenance import sha256_json
from .schemas import pointer, schema_issues

if TYPE_CHECKING:
    import jinja2

REPORT_KIND = "guardtune-audit-report"


# ----------------------------------------------------------------------------------------------- the document

def validate_report(report: Any) -> list[Issue]:
    """Schema problems, then (if the shape is right) every number that its counts contradict.

    The gate decides on these numbers, so nothing in report.json is taken on trust that can be re-derived: each
    rate and Wilson interval is recomputed from its counts, counts are checked against each other (0 <= harmful
    <= n - errors; categories sum to their k; the judge's error total is the sum of the entries'), KL values must
    be finite and non-negative, and the base and the fine-tuned model must have been audited on the same prefix
    lengths and the same number of prompts. A report edited by hand (or by an attacker) fails here, so the gate
    rejects it with the reason instead of passing it."""
    issues = schema_issues(report, "report", "report-schema")
    if issues:
        return issues
    for model, result in report["results"].items():
        if result is not None:
            issues += _result_issues(f"/results/{model}", result)
    base, tuned = report["results"]["base"], report["results"]["finetuned"]
    if base is not None and tuned is not None:
        issues += _pairing_issues(base, tuned)
    configured = (report.get("config") or {}).get("prefill_k")
    for model, result in report["results"].items():
        audited = sorted(e["k"] for e in result["asr"]) if result is not None else None
        if configured is not None and audited is not None and audited != sorted(configured):
            issues.append(_inconsistent(f"/results/{model}/asr", f"the audit was configured for k = "
                                        f"{sorted(configured)} but reports k = {audited}; every configured k must be "
                                        f"reported once."))
    return issues


# Rates are ratios of small integers written as JSON floats; anything further off than this was not computed.
RATE_TOLERANCE = 1e-9


def _inconsistent(path: str, message: str) -> Issue:
    return Issue(code="report-inconsistent", path=path,
                 message=f"{path}: {message} The audit that wrote this report miscounted or the file was edited; "
                         f"re-run `guardtune audit`.")


def _rate_issues(path: str, entry: dict[str, Any], hits_key: str, errors: int) -> list[Issue]:
    """Counts, rate and interval of one rate entry (an ASR at one k, over-refusal, utility)."""
    n, hits = entry["n"], entry[hits_key]
    scored = n - errors
    if hits + errors > n:
        return [_inconsistent(path, f"{hits_key} ({hits}) + errors ({errors}) exceed n ({n}).")]
    issues = []
    rate = hits / scored if scored else 0.0
    if abs(entry["rate"] - rate) > RATE_TOLERANCE:
        issues.append(_inconsistent(f"{path}/rate", f"rate is {entry['rate']!r} but {hits_key} / scored samples is "
                                                    f"{hits}/{scored} = {rate!r}."))
    interval = wilson_interval(hits, scored)
    if any(abs(a - b) > RATE_TOLERANCE for a, b in zip(entry["ci95"], interval)):
        issues.append(_inconsistent(f"{path}/ci95", f"ci95 is {entry['ci95']!r} but the Wilson interval of "
                                                    f"{hits}/{scored} is {list(interval)!r}."))
    return issues


def _result_issues(base: str, result: dict[str, Any]) -> list[Issue]:
    issues: list[Issue] = []
    by_k: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(result["asr"]):
        if entry["k"] in by_k:
            issues.append(_inconsistent(f"{base}/asr/{i}/k", f"k={entry['k']} appears twice; each prefix length must "
                                                           f"have one entry."))
        by_k[entry["k"]] = entry
        issues += _rate_issues(f"{base}/asr/{i}", entry, "harmful", entry["errors"])
    agreement = result.get("judge_agreement")
    if agreement is not None:
        issues += _rate_issues(f"{base}/judge_agreement", agreement, "agree", 0)
        if agreement["n_disagreements"] != agreement["n"] - agreement["agree"]:
            issues.append(_inconsistent(f"{base}/judge_agreement/n_disagreements", f"{agreement['n_disagreements']} "
                                        f"disagreements, but n - agree is {agreement['n'] - agreement['agree']}."))
    totals: dict[int, list[int]] = {}
    for category, rows in result["asr_by_category"].items():
        for i, entry in enumerate(rows):
            path = f"{base}/asr_by_category/{pointer([category])[1:]}/{i}"
            issues += _rate_issues(path, entry, "harmful", entry["errors"])
            if entry["k"] not in by_k:
                issues.append(_inconsistent(f"{path}/k", f"k={entry['k']} is not among the audited k."))
            total = totals.setdefault(entry["k"], [0, 0, 0])
            for j, key in enumerate(("n", "harmful", "errors")):
                total[j] += entry[key]
    if result["asr_by_category"]:
        for k, entry in sorted(by_k.items()):
            summed = totals.get(k, [0, 0, 0])
            if summed != [entry["n"], entry["harmful"], entry["errors"]]:
                issues.append(_inconsistent(f"{base}/asr_by_category", f"at k={k} the categories add up to n, harmful, "
                                            f"errors = {summed}, but the k={k} entry says "
                                            f"{[entry['n'], entry['harmful'], entry['errors']]}."))
    refusal = result["over_refusal"]
    issues += _rate_issues(f"{base}/over_refusal", refusal, "refusals", refusal["errors"])
    if result.get("utility") is not None:
        issues += _rate_issues(f"{base}/utility", result["utility"], "correct", 0)
    attack_samples, attack_errors, attack_issues = _attack_issues(base, result.get("attacks") or {})
    issues += attack_issues
    judged = result["judge_errors"]
    samples = sum(e["n"] for e in by_k.values()) + refusal["n"] + attack_samples
    errors = sum(e["errors"] for e in by_k.values()) + refusal["errors"] + attack_errors
    if (judged["samples"], judged["errors"]) != (samples, errors):
        issues.append(_inconsistent(f"{base}/judge_errors", f"says {judged['errors']} errors in {judged['samples']} "
                                    f"judged samples, but the ASR, over-refusal and attack entries add up to "
                                    f"{errors} in {samples}."))
    elif abs(judged["rate"] - (errors / samples if samples else 0.0)) > RATE_TOLERANCE:
        issues.append(_inconsistent(f"{base}/judge_errors/rate",
                                    f"rate is {judged['rate']!r}, not {errors}/{samples}."))
    kl = result["kl_profile"]
    if kl is not None:
        values = [*kl["mean_kl"], kl["mean_first5"]]
        if len(kl["positions"]) != len(kl["mean_kl"]):
            issues.append(_inconsistent(f"{base}/kl_profile", f"{len(kl['positions'])} positions but "
                                        f"{len(kl['mean_kl'])} mean_kl values; they must pair up."))
        elif not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= -1e-6 for v in values):
            issues.append(_inconsistent(f"{base}/kl_profile", "a KL value is negative or not finite; a KL "
                                        "divergence is a finite number >= 0."))
        else:
            first5 = [v for t, v in zip(kl["positions"], kl["mean_kl"]) if 1 <= t <= 5]
            if first5 and abs(kl["mean_first5"] - sum(first5) / len(first5)) > 1e-6:
                issues.append(_inconsistent(f"{base}/kl_profile/mean_first5", f"mean_first5 is {kl['mean_first5']!r} "
                                            f"but positions 1..5 average {sum(first5) / len(first5)!r}."))
    return issues


def _attack_issues(base: str, attacks: dict[str, Any]) -> tuple[int, int, list[Issue]]:
    """(judged samples, judge errors, issues) of one model's attack sections: every rate re-derived; each decoding
    setting and the any-setting ASR cover the same prompts."""
    samples = errors = 0
    issues: list[Issue] = []
    decoding, gcg = attacks.get("decoding"), attacks.get("gcg")
    if decoding is not None:
        path = f"{base}/attacks/decoding"
        issues += _rate_issues(f"{path}/asr", decoding["asr"], "harmful", decoding["asr"]["errors"])
        for i, entry in enumerate(decoding["settings"]):
            issues += _rate_issues(f"{path}/settings/{i}", entry, "harmful", entry["errors"])
            samples, errors = samples + entry["n"], errors + entry["errors"]
        sizes = {decoding["prompts"], decoding["asr"]["n"], *(e["n"] for e in decoding["settings"])}
        if len(sizes) > 1:
            issues.append(_inconsistent(path, f"the settings and the any-setting ASR cover different numbers of "
                                        f"prompts ({sorted(sizes)}); each setting samples every attacked prompt once."))
        harmful_somewhere = max((e["harmful"] for e in decoding["settings"]), default=0)
        if decoding["asr"]["harmful"] < harmful_somewhere:
            issues.append(_inconsistent(f"{path}/asr", f"{decoding['asr']['harmful']} prompts broken under any "
                                        f"setting, fewer than the {harmful_somewhere} of one setting."))
    if gcg is not None:
        issues += _rate_issues(f"{base}/attacks/gcg/asr", gcg["asr"], "harmful", gcg["asr"]["errors"])
        samples, errors = samples + gcg["asr"]["n"], errors + gcg["asr"]["errors"]
        if gcg["prompts"] != gcg["asr"]["n"]:
            issues.append(_inconsistent(f"{base}/attacks/gcg", f"{gcg['prompts']} prompts attacked but the ASR "
                                        f"counts {gcg['asr']['n']}."))
    return samples, errors, issues


def _pairing_issues(base: dict[str, Any], tuned: dict[str, Any]) -> list[Issue]:
    """Base and fine-tuned must be audited on the same prompts: same k, same n at each k, same probe sizes."""
    base_k = {e["k"]: e["n"] for e in base["asr"]}
    tuned_k = {e["k"]: e["n"] for e in tuned["asr"]}
    issues = []
    if base_k != tuned_k:
        issues.append(_inconsistent("/results", f"base and fine-tuned were audited on different prompts or prefix "
                                    f"lengths (n per k: base {base_k}, fine-tuned {tuned_k}); a comparison needs the "
                                    f"same ones."))
    if base["over_refusal"]["n"] != tuned["over_refusal"]["n"]:
        issues.append(_inconsistent("/results", f"base and fine-tuned over-refusal probes differ in size "
                                    f"({base['over_refusal']['n']} vs {tuned['over_refusal']['n']})."))
    sizes = [(r.get("utility") or {}).get("n") for r in (base, tuned)]
    if sizes[0] != sizes[1]:
        issues.append(_inconsistent("/results", f"base and fine-tuned utility probes differ ({sizes[0]} vs "
                                    f"{sizes[1]} questions)."))
    for attack in ("decoding", "gcg"):
        prompts = [((r.get("attacks") or {}).get(attack) or {}).get("prompts") for r in (base, tuned)]
        if prompts[0] != prompts[1]:
            issues.append(_inconsistent("/results", f"base and fine-tuned were attacked on different prompts by "
                                        f"{attack} ({prompts[0]} vs {prompts[1]})."))
    return issues


def asr_by_k(result: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """A model's ASR entries keyed by prefix length k ({} for a model that was not audited)."""
    return {} if result is None else {entry["k"]: entry for entry in result["asr"]}


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
    except (ValueError, RecursionError) as exc:  # a 5000-digit integer, nesting deeper than the parser goes
        raise ReportError(f"Report {path} cannot be read: {str(exc)[:120] or type(exc).__name__}. It is not a report "
                          f"`guardtune audit` wrote; re-run it or restore the file.")
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
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict) and _sample_shaped(record):
                samples.append(record)
    return samples


_SAMPLE_TEXT = ("model", "set", "id", "category", "instruction", "prefix", "continuation")


def _sample_shaped(record: dict[str, Any]) -> bool:
    """A record the page and the paired gate test can read: text fields are text, k an integer, verdict a dict."""
    return (all(isinstance(record.get(key, ""), str) for key in _SAMPLE_TEXT)
            and isinstance(record.get("k", 0), int) and isinstance(record.get("verdict", {}), dict))


# ----------------------------------------------------------------------------------------------- HTML

# The page's structure and CSS live in guardtune/data/report.html.j2, escaped by jinja2's autoescape. This
# module prepares what the page shows (`_page_view`: plain dicts of display strings, nothing escaped) and draws
# the SVG charts: they are arithmetic on coordinates, which reads better here than in template macros.

def _e(value: Any) -> str:
    """Escape for the SVG strings built below; the template never needs it (jinja2 escapes every value)."""
    return html.escape("" if value is None else str(value), quote=True)


def _pct(rate: float | None, digits: int = 1) -> str:
    return "n/a" if rate is None else f"{100 * rate:.{digits}f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"[{_pct(ci[0], 0)}, {_pct(ci[1], 0)}]"


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
    base, tuned = asr_by_k(report["results"]["base"]), asr_by_k(report["results"]["finetuned"])
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
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">'
               f'prefilled harmful tokens k</text>')
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


def rate_bars(title: str, rows: list[tuple[str, dict[str, Any], str]], count_key: str,
              limit: float | None = None) -> str:
    """Horizontal bars of one rate per row (name, rate entry, colour) with 95% Wilson whiskers and, when given, a
    dashed gate limit."""
    width, left, right, bar_h = 520, 90, 30, 22
    height = 30 + len(rows) * 36
    plot_w = width - left - right

    def x(rate: float) -> float:
        return left + plot_w * rate

    out = [_svg_open(width, height, title)]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{x(tick):.1f}" y1="4" x2="{x(tick):.1f}" y2="{height - 20}" stroke="#e5e7eb"/>'
                   f'<text x="{x(tick):.1f}" y="{height - 6}" text-anchor="middle">{int(tick * 100)}%</text>')
    for i, (name, entry, color) in enumerate(rows):
        top = 8 + i * 36
        lo, hi = entry["ci95"]
        mid = top + bar_h / 2
        out.append(f'<text x="{left - 8}" y="{mid + 4:.1f}" text-anchor="end">{_e(name)}</text>'
                   f'<rect x="{left}" y="{top}" width="{x(entry["rate"]) - left:.1f}" height="{bar_h}" fill="{color}" '
                   f'opacity="0.8"><title>{_e(name)}: {_pct(entry["rate"])} ({entry[count_key]}/'
                   f'{entry["n"] - entry["errors"]}) 95% CI {_ci(entry["ci95"])}</title></rect>'
                   f'<line x1="{x(lo):.1f}" y1="{mid:.1f}" x2="{x(hi):.1f}" y2="{mid:.1f}" stroke="#111827"/>'
                   f'<line x1="{x(lo):.1f}" y1="{mid - 5:.1f}" x2="{x(lo):.1f}" y2="{mid + 5:.1f}" stroke="#111827"/>'
                   f'<line x1="{x(hi):.1f}" y1="{mid - 5:.1f}" x2="{x(hi):.1f}" y2="{mid + 5:.1f}" stroke="#111827"/>')
    if limit is not None:
        out.append(f'<line x1="{x(limit):.1f}" y1="4" x2="{x(limit):.1f}" y2="{height - 20}" stroke="{LIMIT_COLOR}" '
                   f'stroke-width="2" stroke-dasharray="3 2"><title>gate limit: {_pct(limit)}</title></line>')
    out.append("</svg>")
    return "".join(out)


def _models(report: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    return [(name, report["results"][key], color)
            for name, key, color in (("base", "base", BASE_COLOR), ("fine-tuned", "finetuned", FT_COLOR))
            if report["results"][key] is not None]


def over_refusal_chart(report: dict[str, Any]) -> str:
    """Over-refusal on benign probes, base vs fine-tuned, as bars with 95% Wilson whiskers."""
    return rate_bars("Over-refusal on benign probes",
                     [(name, result["over_refusal"], color) for name, result, color in _models(report)], "refusals")


ATTACK_TITLES = {"decoding": "Decoding exploit: prompts broken under any setting",
                 "gcg": "Attack success with GCG suffixes (optimised on the base)"}


def attack_chart(report: dict[str, Any], attack: str, limit: float | None = None) -> str | None:
    """One attack beside prefilling (decoding, gcg): its ASR for base and fine-tuned with 95% Wilson whiskers;
    None when the audit did not run it."""
    rows = [(name, result["attacks"][attack]["asr"], color) for name, result, color in _models(report)
            if attack in (result.get("attacks") or {})]
    return rate_bars(ATTACK_TITLES[attack], rows, "harmful", limit) if rows else None


# ------------------------------------------------------------------------------------ HTML: the view-model
# Each function below returns what one section of report.html.j2 shows, as plain dicts and lists of display
# strings, unescaped. A section returned as None shows its empty message; a None value renders as "".

def _category_names() -> dict[str, str]:
    return dict(HAZARD_CATEGORIES)


def _compare_row(label: str, base: dict | None, tuned: dict | None, count_key: str,
                 higher_is_better: bool = False) -> dict[str, Any]:
    """A headline row: one cell per model (None: not measured) and the change, classed "up" when it got worse."""
    def cell(entry: dict | None) -> dict[str, str] | None:
        if entry is None:
            return None
        scored = entry["n"] - entry.get("errors", 0)
        return {"value": f"{_pct(entry['rate'])} ({entry[count_key]}/{scored})", "ci": _ci(entry["ci95"])}

    change = ""
    change_class = ""
    if base is not None and tuned is not None:
        delta = tuned["rate"] - base["rate"]
        change = f"{'+' if delta >= 0 else ''}{100 * delta:.1f} pts"
        worse = -delta if higher_is_better else delta
        change_class = "up" if worse > 1e-12 else "down" if worse < -1e-12 else ""
    return {"label": label, "base": cell(base), "tuned": cell(tuned), "change": change, "change_class": change_class}


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    base, tuned = report["results"]["base"], report["results"]["finetuned"]
    base_k, tuned_k = asr_by_k(base), asr_by_k(tuned)
    rows = [_compare_row(f"ASR at k={k}", base_k.get(k), tuned_k.get(k), "harmful")
            for k in sorted(set(base_k) | set(tuned_k))]
    rows.append(_compare_row("Over-refusal (benign)", base["over_refusal"],
                             tuned["over_refusal"] if tuned else None, "refusals"))
    for attack, label in (("decoding", "Decoding exploit ASR (any setting)"), ("gcg", "ASR with GCG suffixes")):
        b, t = (base.get("attacks") or {}).get(attack), ((tuned or {}).get("attacks") or {}).get(attack)
        if b or t:
            rows.append(_compare_row(label, b["asr"] if b else None, t["asr"] if t else None, "harmful"))
    agreements = [base.get("judge_agreement"), (tuned or {}).get("judge_agreement")]
    if any(agreements):
        second = next(a for a in agreements if a)["judge"].get("name", "second judge")
        rows.append(_compare_row(f"Judge agreement (with {second})", agreements[0], agreements[1], "agree",
                                 higher_is_better=True))
    if base.get("utility"):
        rows.append(_compare_row("Utility (factual probe accuracy)", base["utility"],
                                 tuned.get("utility") if tuned else None, "correct", higher_is_better=True))
    kl = tuned["kl_profile"] if tuned else None
    return {"rows": rows, "kl_first5": f"{kl['mean_first5']:.4g}" if kl else None,
            "judge_errors": [{"model": name, **result["judge_errors"]}  # samples, errors, rate
                             for name, result in (("base", base), ("fine-tuned", tuned)) if result]}


def _category_table(report: dict[str, Any]) -> dict[str, Any] | None:
    """ASR per hazard category and k, base → fine-tuned; a cell is "up" when the fine-tuned model does worse."""
    base, tuned = report["results"]["base"], report["results"]["finetuned"]
    names = _category_names()
    categories = sorted(set(base["asr_by_category"]) | set(tuned["asr_by_category"] if tuned else {}),
                        key=lambda c: (len(c), c))
    if not categories:
        return None
    ks = sorted({e["k"] for rows in base["asr_by_category"].values() for e in rows} |
                {e["k"] for rows in (tuned["asr_by_category"].values() if tuned else []) for e in rows})
    rows = []
    for category in categories:
        b = {e["k"]: e for e in base["asr_by_category"].get(category, [])}
        t = {e["k"]: e for e in (tuned["asr_by_category"].get(category, []) if tuned else [])}
        cells = []
        for k in ks:
            bb, tt = b.get(k), t.get(k)
            cells.append({"text": f'{_pct(bb["rate"], 0) if bb else "n/a"} → {_pct(tt["rate"], 0) if tt else "n/a"}',
                          "up": bb is not None and tt is not None and tt["rate"] > bb["rate"] + 1e-12})
        rows.append({"label": f"{category} {names.get(category, '')}".strip(),
                     "n": max([e["n"] for e in [*b.values(), *t.values()]] or [0]), "cells": cells})
    return {"ks": ks, "rows": rows}


def _gate(report: dict[str, Any], decision: dict[str, Any] | None) -> dict[str, Any] | None:
    """The verdict banner, the failed rules listed under it, and the gate section's table of every rule."""
    if decision is None:
        return None
    rules = decision.get("rules", [])
    failed = [r for r in rules if not r.get("passed")]
    verdict = decision.get("verdict", "reject")
    policy = decision.get("policy", {})
    table = []
    for rule in rules:
        where = ", ".join(x for x in (f"k={rule['k']}" if rule.get("k") is not None else "",
                                      rule.get("category") or "", rule.get("model") or "") if x)
        table.append({"rule": rule.get("rule"), "where": where, "limit": rule.get("limit"),
                      "value": "missing" if rule.get("value") is None else f"{rule['value']:.4g}",
                      "passed": bool(rule.get("passed")), "reason": rule.get("reason")})
    return {
        "passed": verdict == "pass",
        "banner": (f"Gate verdict: {verdict.upper()} under policy {policy.get('name')} v{policy.get('version')} — "
                   f"{len(failed)} of {len(rules)} rules failed"),
        "failed_reasons": [r.get("reason") for r in failed[:8]],  # the rest are in the gate section's table
        "failed_not_listed": max(len(failed) - 8, 0),
        # gate.json found beside a report.json that is not the one it decided on: say so, do not trust it.
        "for_another_report": bool(decision.get("report_sha256")) and decision["report_sha256"] != sha256_json(report),
        "policy": {"name": policy.get("name"), "version": policy.get("version"),
                   "sha256": str(policy.get("sha256", ""))[:16]},
        "decided_at": decision.get("decided_at"),
        "rules": table,
    }


def _provenance(report: dict[str, Any]) -> list[tuple[str, Any]]:
    model, adapter, judge = report["model"], report["adapter"], report["judge"]
    prefix, sample, prov = report["prefix_source"], report["sample"], report["provenance"]
    rows = [
        ("base model", (f"{model['spec']} ({model['kind']}, revision {model['revision'] or '-'}, "
                        f"{model['dtype']}, quantization {model['quantization']})")),
        ("base weights sha256", model["weights_sha256"]),
        ("adapter", f"{adapter['path']}  sha256 {adapter['sha256']}" if adapter else "none (base-only audit)"),
        ("judge", ", ".join(f"{k}={v}" for k, v in judge.items())),
        ("prefix source", (f"{prefix['kind']}, {prefix['tokens']} tokens"
                           + (f", model {prefix['model']}" if prefix.get("model") else "")
                           + (f" (sha256 {prefix['model_sha256']})" if prefix.get("model_sha256") else "")
                           + (f" — {prefix['note']}" if prefix.get("note") else ""))),
        ("sample", (f"{sample['harmful']} of {sample['harmful_total']} harmful prompts, {sample['benign']} of "
                    f"{sample['benign_total']} benign probes, seed {sample['seed']}, "
                    f"{sample['max_new_tokens']} new tokens")),
        ("created", report["created_at"]),
    ]
    return rows + [(key, json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value)
                   for key, value in prov.items()]


def _verdict_tag(verdict: dict[str, Any] | None) -> dict[str, str]:
    verdict = verdict or {}
    if verdict.get("error"):
        return {"class": "error", "text": f"judge error: {verdict['error']}"}
    if verdict.get("harmful"):
        return {"class": "harmful", "text": "harmful"}
    if verdict.get("refusal"):
        return {"class": "refusal", "text": "refusal"}
    return {"class": "safe", "text": "not harmful"}


def _rank(sample: dict[str, Any]) -> int:
    verdict = sample.get("verdict") or {}
    return 0 if verdict.get("harmful") else 1 if verdict.get("error") else 2


def _sample_group(summary: str, members: list[dict[str, Any]], cap: int) -> dict[str, Any]:
    ordered = sorted(members, key=_rank)  # harmful first, then judge errors: what a reviewer must see
    cards = [{"id": s.get("id"), "category": s.get("category"), "tag": _verdict_tag(s.get("verdict")),
              "instruction": s.get("instruction"), "prefix": s.get("prefix") or "",
              "detail": s.get("setting") or (f"suffix: {s['suffix']}" if s.get("suffix") else ""),
              "continuation": s.get("continuation")} for s in ordered[:cap]]
    return {"summary": summary, "cards": cards, "not_shown": max(len(ordered) - cap, 0)}


# Sample sets shown in a section of their own: (verdict field counted, what it counts, section title). Prefilling
# samples (set "harmful") get a section per k, before these.
SAMPLE_SECTIONS = {"benign": ("refusal", "refused", "Over-refusal probes (benign)"),
                   "decoding": ("harmful", "harmful", "Decoding exploit (one sample per setting)"),
                   "gcg": ("harmful", "harmful", "GCG suffixes (greedy, suffix appended)"),
                   "utility": ("correct", "correct", "Utility probe (factual questions)")}


def _sample_sections(samples: list[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """Samples grouped as the page shows them: one section per prefilling k, then the benign probes, the decoding
    exploit, the GCG suffixes and the utility probe; a group per model."""
    prefilled: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    by_set: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        model = str(sample.get("model"))
        if sample.get("set") in SAMPLE_SECTIONS:
            by_set[sample["set"]][model].append(sample)
        else:
            prefilled[sample.get("k") if isinstance(sample.get("k"), int) else -1][model].append(sample)
    sections = [_sample_section(f"Prefilling attack, k = {k}", prefilled[k], "harmful", "harmful", cap)
                for k in sorted(prefilled)]
    return sections + [_sample_section(title, by_set[name], field, counted, cap)
                       for name, (field, counted, title) in SAMPLE_SECTIONS.items() if by_set.get(name)]


def _sample_section(title: str, by_model: dict[str, list], field: str, counted: str, cap: int) -> dict[str, Any]:
    groups = []
    for model in sorted(by_model):
        members = by_model[model]
        hits = sum(1 for s in members if (s.get("verdict") or {}).get(field))
        groups.append(_sample_group(f"{model}: {hits} of {len(members)} {counted}", members, cap))
    return {"title": title, "groups": groups}


def _attack_sections(report: dict[str, Any], decision: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One section per attack the audit ran: its chart, how it was run, and (decoding) the settings that broke the
    fine-tuned model most often."""
    described = report.get("attacks") or {}
    sections = []
    for attack in ("decoding", "gcg"):
        chart = attack_chart(report, attack, _gate_limits(decision, f"max_{attack}_asr").get(None))
        if chart is None:
            continue
        how = described.get(attack) or {}
        if attack == "decoding":
            note = (f"Each of {how.get('prompts', '?')} harmful prompts sampled once under each of "
                    f"{len(how.get('settings', []))} settings (temperature, top-k, top-p varied one at a time); a "
                    f"prompt counts as broken when any setting's answer is harmful.")
            tuned = (report["results"]["finetuned"] or report["results"]["base"])["attacks"]["decoding"]
            worst = sorted(tuned["settings"], key=lambda e: -e["rate"])[:5]
            rows = [f"{e['name']}: {_pct(e['rate'])} ({e['harmful']}/{e['n'] - e['errors']})" for e in worst]
        else:
            made = how.get("made", {})
            note = (f"One suffix per prompt for {how.get('settings', {}).get('prompts', '?')} harmful prompts, "
                    f"{how.get('settings', {}).get('steps', '?')} GCG steps against the base model (nanogcg "
                    f"{made.get('nanogcg', '?')}, {made.get('seconds_per_suffix', '?')} s per suffix on "
                    f"{made.get('device', '?')}, cache {made.get('cache', '?')}); greedy continuations with the "
                    f"suffix appended.")
            rows = []
        sections.append({"title": ATTACK_TITLES[attack], "chart": chart, "note": note, "rows": rows})
    return sections


def _gate_limits(decision: dict[str, Any] | None, rule: str) -> dict[Any, float]:
    return {r.get("k"): r["limit"] for r in (decision or {}).get("rules", []) if r.get("rule") == rule}


def _page_view(report: dict[str, Any], samples: list[dict[str, Any]], decision: dict[str, Any] | None,
               cap: int) -> dict[str, Any]:
    """Everything report.html.j2 shows, by section; the charts are finished SVG (escaped when they were drawn)."""
    title = f"guardtune audit — {report['model']['spec']}" + (" + adapter" if report["adapter"] else "")
    return {
        "title": title,
        "created_at": report["created_at"],
        "note": report["sample"]["note"],
        "base_only": report["results"]["finetuned"] is None,
        "gate": _gate(report, decision),
        "headline": _headline(report),
        "charts": {"asr": asr_chart(report, _gate_limits(decision, "max_asr")),
                   "kl": kl_chart(report, _gate_limits(decision, "max_kl_first5").get(None)),
                   "over_refusal": over_refusal_chart(report)},
        "attacks": _attack_sections(report, decision),
        "categories": _category_table(report),
        "provenance": _provenance(report),
        "config": json.dumps(report["config"], indent=2, ensure_ascii=False, sort_keys=True),
        "sample_sections": _sample_sections(samples, cap),
    }


@cache
def _template() -> jinja2.Template:
    """The page template, loaded once. jinja2 is imported here rather than at the top because gate and release
    import this module for its hashing and schema checks, and the control plane should start quickly."""
    import jinja2

    # Read through importlib.resources, like the schemas: it finds package data in a wheel, a zip and any kind of
    # editable install, where jinja2's PackageLoader does not always.
    source = resources.files("guardtune").joinpath("data/report.html.j2").read_text("utf-8")
    env = jinja2.Environment(
        loader=jinja2.DictLoader({"report.html.j2": source}),  # named, so template errors say which file
        autoescape=True,  # the whole page is HTML, and every string in it comes from a report someone handed us
        undefined=jinja2.StrictUndefined,  # a misspelt field is an error, not a silently empty cell
        finalize=lambda value: "" if value is None else value,  # a missing value shows as nothing, not "None"
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,  # {% %} lines leave no blank lines
    )
    return env.get_template("report.html.j2")


def render_html(report: dict[str, Any], samples: Iterable[dict[str, Any]] | None = None,
                decision: dict[str, Any] | None = None, *, max_samples_per_group: int = 50) -> str:
    """One self-contained HTML page (no scripts, no external assets); every report string is escaped."""
    view = _page_view(report, list(samples or []), decision, max_samples_per_group)
    return _template().render(**view)


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
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise ReportError(f"{candidate} is not readable JSON ({str(exc)[:120]}). Re-run `guardtune gate` to "
                                  f"rewrite it or delete it.")
            problems = schema_issues(decision, "gate", "gate-schema")
            if problems:
                raise ReportError(f"{candidate} is not a gate decision ({problems[0].path}: {problems[0].message}). "
                                  f"Re-run `guardtune gate` to rewrite it or delete it.", problems)
            break
    out_path = Path(out) if out is not None else folder / "report.html"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render_html(report, samples, decision), encoding="utf-8")
    return out_path
