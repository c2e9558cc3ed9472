"""Typed result records of a pipeline run, and their one file form (JSON; CSV for the sweeps).

The stages write them; `report`, `python -m pipelines.compare` and `cdiff compare` read them, and no
metric is read back by a string key anywhere else. They are plain dataclasses, so the library's CLI
reads a run's summary without the pipeline. Floats must be finite: a NaN stops the write.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cdiff.config import from_dict
from cdiff.errors import CdiffError
from cdiff.io import Artefact, atomic_write, read_json, write_json

R = TypeVar("R")


@dataclass(frozen=True)
class Score:
    """A set of images in the eyes of its dataset's judge, each value with its seeded bootstrap 95% interval."""

    fid: float  # judge-feature FID against the real test split, bias-corrected (cdiff.bootstrap): lower is better
    gan_test: float  # share of the images the judge classifies as their class
    images: int  # how many were scored
    fid_interval: list[float] | None = None  # [low, high]: resampling the generated and the real images by class
    gan_test_interval: list[float] | None = None  # [low, high]: resampling the generated images by class
    fid_raw: float | None = None  # the FID as measured at this count, biased upwards (by about D/N)
    kid: float | None = None  # Kernel Inception Distance in the judge's features: unbiased at any count
    kid_std: float | None = None  # its std over subsets
    cas: float | None = None  # classification accuracy score: a classifier trained on these images, on real test
    cas_interval: list[float] | None = None  # [low, high]: resampling the real test images by class

    def row(self) -> dict:
        """Its fields as a bench's JSON row (`images` as `count`)."""
        out = dataclasses.asdict(self)
        out["count"] = out.pop("images")
        return out

    def shown(self, what: str) -> str:
        """'63.7 [58.2, 70.1]' (FID) or '72.7% [66.0%, 78.9%]' (gan_test): the value and its interval."""
        if what == "kid":
            return "-" if self.kid is None else f"{self.kid:.3g} ± {self.kid_std or 0:.2g}"
        value, ci = getattr(self, what), getattr(self, f"{what}_interval")
        if value is None:
            return "-"
        fmt = "{:.1%}" if what in ("gan_test", "cas") else "{:.4g}"
        return fmt.format(value) + ("" if ci is None else f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]")

    def fid_beats(self, other: Score) -> bool | None:
        """True: lower FID beyond both intervals; False: higher beyond them; None: a tie within the noise."""
        if self.fid_interval is None or other.fid_interval is None:
            return None if self.fid == other.fid else self.fid < other.fid
        if self.fid_interval[1] < other.fid_interval[0]:
            return True
        return False if self.fid_interval[0] > other.fid_interval[1] else None


@dataclass(frozen=True)
class Comparison:
    """A minus B in one metric, with the paired bootstrap 95% interval of the difference, and what it says
    for A: 'better' (beyond the interval), 'tie' (the interval holds 0) or 'worse'. `paired` False: only the two
    values' own intervals could be compared (`difference_interval` is then None)."""

    difference: float
    difference_interval: list[float] | None
    verdict: str
    paired: bool = True

    def shown(self) -> str:
        ci = self.difference_interval
        interval = "" if ci is None else f" [{ci[0]:+.4g}, {ci[1]:+.4g}]"
        return f"{self.difference:+.4g}{interval} ({self.verdict}{'' if self.paired else ', unpaired'})"

    @classmethod
    def of(cls, difference) -> Comparison:
        """From a cdiff.bootstrap.Difference."""
        return cls(difference.value, [difference.low, difference.high], difference.verdict)


@dataclass(frozen=True)
class PretrainResult:
    val_loss: float
    final_train_loss: float
    steps: int


@dataclass(frozen=True)
class JudgeResult:
    test_accuracy: float  # on the real test split: the ceiling for GAN-test accuracy
    test_images: int


@dataclass(frozen=True)
class BaseEvaluation:
    floor: Score  # real train images vs the real test split
    base: Score
    judge_test_accuracy: float
    sampler: str  # the label of the sampler used, e.g. ddim-50
    guidance_scale: float


@dataclass(frozen=True)
class DomainEvaluation:
    floor: Score | None  # None, like base and adapter, where a judge cannot score the domain (see judge_note)
    base: Score | None  # the base alone on the domain
    adapter: Score | None  # base + adapter (merged)
    test_loss_base: float  # the deterministic epsilon loss on the test split
    test_loss_adapter: float
    judge_test_accuracy: float
    r: int  # the adapter's own (adapter_config.json)
    alpha: float
    trainable_params: int
    trainable_share: float  # of the base's parameters
    judge_note: str = ""  # why the judge scores are None (a domain of one class), else empty
    adapter_vs_base_fid: Comparison | None = None  # adapter minus base, paired on the same real split
    adapter_vs_base_gan_test: Comparison | None = None


@dataclass(frozen=True)
class FinetuneResult:
    r: int
    alpha: float
    lr: float
    val_loss: float
    trainable_params: int
    trainable_share: float


@dataclass(frozen=True)
class FullFinetuneResult:
    score: Score
    test_loss: float
    trainable_params: int


@dataclass(frozen=True)
class PerClass:
    """GAN-test accuracy per class, per model ('base', 'adapter', 'full'): the detail behind a Score."""

    accuracy: dict[str, dict[str, float]]


@dataclass(frozen=True)
class TuneTrial:
    trial: int
    r: int
    alpha: float
    lr: float
    val_loss: float  # the best validation loss the trial reached
    steps: int  # how far it ran before ASHA stopped it (or its budget ran out)
    objective: str = "val_loss"  # what the search optimised: val_loss, fid or gan_test
    score: float | None = None  # the best value of the objective the trial reached (None in older files)
    variant: str | None = None  # lora, rslora or dora (tune.variants); None (older files): the domain's own
    up_r: int | None = None  # the up path's own rank (tune.up_ranks); None: the trial's r throughout


@dataclass(frozen=True)
class TuneTrials:
    trials: list[TuneTrial]


@dataclass(frozen=True)
class SweepPoint:
    setting: str  # a guidance scale ("2.0") or a sampler label ("ddim-50")
    score: Score
    seconds: float  # to generate the images


@dataclass(frozen=True)
class Goal:
    goal: str
    value: float | None  # None where it is undefined (e.g. a full fine-tune no better than the base)
    target: float
    met: bool


@dataclass(frozen=True)
class BaseSummary:
    pretrain: PretrainResult
    evaluation: BaseEvaluation
    goals: list[Goal]


@dataclass(frozen=True)
class DomainSummary:
    evaluation: DomainEvaluation
    lr: float  # chosen by Tune
    full: FullFinetuneResult | None
    goals: list[Goal]
    adapter_vs_full_fid: Comparison | None = None  # adapter minus full fine-tune, paired on the same real split


@dataclass(frozen=True)
class RunSummary:
    """reports/summary.json: what `cdiff compare` prints."""

    settings: str
    base: BaseSummary
    domains: dict[str, DomainSummary] = field(default_factory=dict)
    format: str = "cdiff-report"  # marks the folder as a report, which only a report may replace


REPORT = Artefact("report folder", folder=True, marker="summary.json", format=RunSummary.format)


def save(path: str | Path, record) -> None:
    data = dataclasses.asdict(record)
    _check_finite(data, Path(path).name)
    write_json(path, data)


def load(path: str | Path, cls: type[R], what: str | None = None) -> R:
    """Read a record; a missing, corrupt or outdated file is a one-line error."""
    path = Path(path)
    raw = read_json(path, what or f"{cls.__name__} record")
    return from_dict(cls, raw, path.name)


def scalars(record, prefix: str = "") -> dict[str, float]:
    """The numbers of a record under dotted names ('adapter.fid'): what MLflow logs."""
    out = {}
    for key, value in (dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record).items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
        elif key.endswith("_interval") and isinstance(value, list) and len(value) == 2:  # fid_interval -> fid_low
            (
                out[f"{prefix}{key.removesuffix('_interval')}_low"],
                out[f"{prefix}{key.removesuffix('_interval')}_high"],
            ) = (
                float(value[0]),
                float(value[1]),
            )
    return out


SWEEP_COLUMNS = ("fid", "fid_low", "fid_high", "fid_raw", "kid", "gan_test", "gan_test_low", "gan_test_high")


def save_sweep(path: str | Path, over: str, points: list[SweepPoint]) -> None:
    """A sweep as CSV for `dvc plots`: one row per setting, each value with its interval (empty where none)."""
    _check_finite([dataclasses.asdict(p) for p in points], Path(path).name)

    def cells(score: Score) -> list[str]:
        fid_ci, acc_ci = score.fid_interval or [None, None], score.gan_test_interval or [None, None]
        values = [score.fid, *fid_ci, score.fid_raw, score.kid, score.gan_test, *acc_ci]
        return ["" if v is None else f"{v:.6f}" for v in values]

    rows = [",".join([p.setting, *cells(p.score), f"{p.seconds:.3f}", str(p.score.images)]) + "\n" for p in points]
    with atomic_write(path) as tmp:
        tmp.write_text(",".join([over, *SWEEP_COLUMNS, "seconds", "images"]) + "\n" + "".join(rows))


def load_sweep(path: str | Path) -> list[SweepPoint]:
    path = Path(path)
    if not path.is_file():
        raise CdiffError(f"sweep not found: {path}")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
            if header[1:] != [*SWEEP_COLUMNS, "seconds", "images"]:
                raise ValueError(f"columns {header[1:]}")
            points = []
            for setting, *cells, seconds, images in reader:
                v = [None if c == "" else float(c) for c in cells]
                fid_ci = None if v[1] is None else [v[1], v[2]]
                acc_ci = None if v[6] is None else [v[6], v[7]]
                score = Score(v[0], v[5], int(images), fid_ci, acc_ci, fid_raw=v[3], kid=v[4])
                points.append(SweepPoint(setting, score, float(seconds)))
            return points
        except (StopIteration, ValueError, TypeError) as e:
            raise CdiffError(f"sweep {path} is not a sweep CSV ({e}): rerun its stage") from e


def save_curve(path: str | Path, curve: list[tuple[int, float]]) -> None:
    """A loss curve as CSV (step, loss) for `dvc plots`."""
    _check_finite([v for _, v in curve], Path(path).name)
    with atomic_write(path) as tmp:
        tmp.write_text("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in curve))


def load_curve(path: str | Path) -> list[tuple[int, float]]:
    path = Path(path)
    if not path.is_file():
        raise CdiffError(f"loss curve not found: {path}")
    with open(path, newline="") as f:
        try:
            return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]
        except (KeyError, ValueError) as e:
            raise CdiffError(f"loss curve {path} is not a step,loss CSV ({e}): rerun its stage") from e


def _check_finite(data, where: str) -> None:
    values = data.values() if isinstance(data, dict) else data if isinstance(data, list) else [data]
    for value in values:
        if isinstance(value, dict | list):
            _check_finite(value, where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise CdiffError(f"{where}: a result is {value}: the model or the judge diverged")
