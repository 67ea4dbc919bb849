"""Two judges in one audit (audit.second_judge): their agreement and disagreements in report.json, checked like
every other rate, and gate.min_judge_agreement as a floor that fails closed without a second judge."""

from __future__ import annotations

import json

import pytest

from fixtures.make_report import make_report
from guardtune.gate import decide
from guardtune.judges import Verdict, judge_agreement
from guardtune.report import validate_report
from test_gate import gate_only


def v(harmful: bool | None, error: str | None = None) -> Verdict:
    return Verdict(harmful=harmful, refusal=False, score=None, categories=[], raw="", error=error)


def test_agreement_counts_both_scored_samples_and_lists_the_disagreements():
    first = [v(True), v(True), v(False), v(False), v(True), v(None, "timeout")]
    second = [v(True), v(False), v(False), v(False), v(False), v(True)]
    where = [("harmful", f"p{i}", 5) for i in range(6)]
    got = judge_agreement(first, second, where, {"name": "other"})
    assert (got["n"], got["agree"], got["n_disagreements"]) == (5, 3, 2)
    assert got["rate"] == pytest.approx(0.6) and got["disagreements"][0] == {
        "set": "harmful", "id": "p1", "k": 5, "first": True, "second": False}
    # Cohen's kappa: p_o 0.6, p_first 0.6, p_second 0.2 -> p_e 0.12 + 0.32 = 0.44 -> (0.6 - 0.44) / 0.56
    assert got["kappa"] == pytest.approx(0.16 / 0.56)


def test_an_audit_with_a_second_judge_reports_agreement(tiny_model_dir, tmp_path):
    from guardtune.auditing import audit

    result = audit(model=str(tiny_model_dir), out=tmp_path / "a", prefix_model=str(tiny_model_dir),
                   sample_harmful=5, sample_benign=3, sample_utility=2, max_new_tokens=4, prefill_k=(0, 3),
                   prefix_tokens=6, kl_positions=4, batch_size=8, use_cache=False, decoding_attack=False,
                   gcg_attack=False, second_judge={"name": "keyword", "assume_harmful": False})
    agreement = result.results["base"]["judge_agreement"]
    assert agreement["judge"]["assume_harmful"] is False and agreement["n"] == 5 * 2 + 3
    assert validate_report(result.report) == []
    samples = [json.loads(line) for line in result.samples_path.read_text().splitlines()]
    judged = [s for s in samples if s["set"] != "utility"]
    assert all("second_verdict" in s for s in judged) and not any("second_verdict" in s for s in samples
                                                                   if s["set"] == "utility")
    flips = sum(s["verdict"]["harmful"] != s["second_verdict"]["harmful"] for s in judged)
    assert flips == agreement["n_disagreements"]


def agreed(report: dict, rate_agree: int, n: int = 20) -> dict:
    from guardtune.judges import wilson_interval

    for model in ("base", "finetuned"):
        report["results"][model]["judge_agreement"] = {
            "judge": {"name": "other"}, "n": n, "agree": rate_agree, "rate": rate_agree / n,
            "ci95": list(wilson_interval(rate_agree, n)), "kappa": None, "n_disagreements": n - rate_agree,
            "disagreements": []}
    return report


def test_the_gate_floor_on_agreement_passes_rejects_and_fails_closed():
    passing = decide(agreed(make_report(), 19), gate_only(min_judge_agreement=0.9))
    assert passing.verdict == "pass"
    low = decide(agreed(make_report(), 15), gate_only(min_judge_agreement=0.9))
    assert low.verdict == "reject" and "agree on 15 of 20" in low.failed_rules[0].reason
    missing = decide(make_report(), gate_only(min_judge_agreement=0.9))
    assert missing.verdict == "reject" and "audit.second_judge" in missing.failed_rules[0].reason
    tampered = agreed(make_report(), 15)
    tampered["results"]["base"]["judge_agreement"]["rate"] = 0.95
    assert any(i.path == "/results/base/judge_agreement/rate" for i in validate_report(tampered))


def test_the_html_report_shows_the_judges_agreement():
    from guardtune.report import render_html

    html = render_html(agreed(make_report(), 17))
    assert "Judge agreement (with other)" in html and "85.0% (17/20)" in html
    assert "Judge agreement" not in render_html(make_report())
