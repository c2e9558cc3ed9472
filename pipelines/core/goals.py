"""The quality goals of a run (issue 9's CPU targets), checked against its result records."""

from __future__ import annotations

from cdiff.results import BaseEvaluation, DomainEvaluation, FullFinetuneResult, Goal


def base_goals(e: BaseEvaluation) -> list[Goal]:
    """The base model on its own dataset."""
    return [
        _goal(
            "GAN-test accuracy >= 80% of the judge's real test accuracy",
            e.base.gan_test,
            0.8 * e.judge_test_accuracy,
            e.base.gan_test >= 0.8 * e.judge_test_accuracy,
        ),
        _floor_goal(e),
    ]


def _floor_goal(e: BaseEvaluation) -> Goal:
    """The floor (real vs real) is a distance of about 0 once bias-corrected, so a ratio to it is undefined:
    the goal compares the raw FIDs, both measured at the same count and so biased alike."""
    name = "raw FID within 6x of the real-vs-real raw FID at the same count (the floor)"
    base, floor = e.base.fid_raw, e.floor.fid_raw
    if base is None or floor is None:  # not measured: the goal is not met
        return _goal(name, base, 6 * (floor or 0.0), False)
    return _goal(name, base, 6 * floor, base <= 6 * floor)


def domain_goals(e: DomainEvaluation, full: FullFinetuneResult | None) -> list[Goal]:
    """A domain adapter, against the base alone and (when there is one) the full fine-tune. The judge's goals
    are left out where a judge cannot score the domain (e.judge_note says why)."""
    size = _goal("trainable parameters <= 3% of the base", e.trainable_share, 0.03, e.trainable_share <= 0.03)
    if e.adapter is None or e.base is None:
        return [size]
    goals = [
        _goal("FID better than the base without adapter", e.adapter.fid, e.base.fid, e.adapter.fid < e.base.fid),
        _goal("GAN-test accuracy >= 70%", e.adapter.gan_test, 0.7, e.adapter.gan_test >= 0.7),
        size,
    ]
    if full is not None:
        gap = e.base.fid - full.score.fid
        share = (e.base.fid - e.adapter.fid) / gap if gap > 0 else None  # undefined if the full FT is no better
        goals.append(
            _goal(
                "at least 60% of the way from the base's FID to the full fine-tune's",
                share,
                0.6,
                share is not None and share >= 0.6,
            )
        )
    return goals


def _goal(name: str, value: float | None, target: float, met: bool) -> Goal:
    return Goal(name, None if value is None else float(value), float(target), bool(met))
