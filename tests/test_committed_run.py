"""The committed default run: its records hold what the README says of them, and the README quotes them.

README.md's results section is copied by hand from reports/ and metrics/, which `dvc repro` wrote; these
checks fail when a rerun changes the records and the README is not updated, or when a headline falls
outside its own interval.
"""

import re

import pytest

from cdiff import results
from cdiff.results import BaseEvaluation, DomainEvaluation, FullFinetuneResult, RunSummary
from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()
SUMMARY = results.load(ROOT / "reports" / "summary.json", RunSummary)
DOMAINS = sorted(SUMMARY.domains)


def _evaluation(domain: str) -> DomainEvaluation:
    return results.load(ROOT / "metrics" / f"{domain}.json", DomainEvaluation)


def _full(domain: str) -> FullFinetuneResult | None:
    path = ROOT / "metrics" / f"full-{domain}.json"
    return results.load(path, FullFinetuneResult) if path.is_file() else None


def _inside(value: float, interval: list[float] | None) -> bool:
    return interval is not None and interval[0] <= value <= interval[1]


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_headline_fid_and_difference_lies_inside_its_interval(domain):
    e, full = _evaluation(domain), _full(domain)
    scores = [e.floor, e.base, e.adapter] + ([full.score] if full else [])
    for score in scores:
        assert _inside(score.fid, score.fid_interval), score
        assert score.kid is not None and score.cas is not None and _inside(score.cas, score.cas_interval)
        assert score.fid_raw is not None
    for comparison in (e.adapter_vs_base_fid, e.adapter_vs_base_gan_test):
        assert comparison.paired and _inside(comparison.difference, comparison.difference_interval)
    base = results.load(ROOT / "metrics" / "base.json", BaseEvaluation)
    assert _inside(base.base.fid, base.base.fid_interval) and _inside(base.floor.fid, base.floor.fid_interval)


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_readme_quotes_each_domains_numbers_as_recorded(domain):
    e, full = _evaluation(domain), _full(domain)
    row = next((line for line in README.splitlines() if line.startswith(f"| {domain} |")), None)
    assert row is not None, f"README's results table has no row for {domain}"
    cells = [c.strip().replace("\\[", "[").replace("\\]", "]") for c in row.strip("|").split("|")]
    quoted = [e.floor.shown("fid"), e.base.shown("fid"), e.adapter.shown("fid")]
    quoted += [full.score.shown("fid")] if full else []
    quoted += [e.adapter.shown("gan_test"), e.adapter.shown("cas")]
    for text in quoted:
        assert text in cells, (domain, text, cells)
    assert f"{e.adapter_vs_base_fid.difference:+.4g}" in row
    vs_full = SUMMARY.domains[domain].adapter_vs_full_fid
    if vs_full is not None:
        assert f"{vs_full.difference:+.4g}" in row and _inside(vs_full.difference, vs_full.difference_interval)


def test_the_readme_quotes_the_base_and_the_goals_as_recorded():
    base = results.load(ROOT / "metrics" / "base.json", BaseEvaluation)
    line = f"Base on fashion: FID {base.base.shown('fid')} (floor {base.floor.shown('fid')}"
    assert line in " ".join(README.split()), line
    goals = [g for d in SUMMARY.domains.values() for g in d.goals] + list(SUMMARY.base.goals)
    assert all(g.met for g in goals)
    met = re.search(r"All (\d+)\s+quality goals are met", README)
    assert met and int(met.group(1)) == len(goals)
