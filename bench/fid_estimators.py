"""Which FID estimate to headline: a simulation with known Gaussians (closed-form FID), 64 features as the
default judge has, N generated vs 10,000 real (Fashion-MNIST's test split), N = 300, 1,000 and 10,000.

Candidates: the raw FID at N; the bootstrap bias-corrected 2F - median(F*) (cdiff.bootstrap, chosen) and
2F - mean(F*); FID-infinity (Chong & Forsyth 2020: FID at 5 subset sizes from N/4 to N, extrapolated linearly
in 1/N). For each: mean bias, sd and RMSE over the draws; and the coverage of the basic bootstrap 95% interval.

    .venv/bin/python bench/fid_estimators.py            # about 6 minutes on 2 CPU cores
    .venv/bin/python bench/fid_estimators.py --quick    # fewer draws
Prints a table; writes bench/results/fid-estimators.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cdiff.bootstrap import _fid_boots, quantiles  # noqa: E402
from cdiff.io import write_json  # noqa: E402
from cdiff.metrics import _frechet, fid  # noqa: E402

D, REAL = 64, 10_000


def gaussians(g: torch.Generator):
    lb = torch.eye(D, dtype=torch.float64) * 1.2 + 0.05 * torch.randn(D, D, generator=g, dtype=torch.float64)
    mu_b = torch.full((D,), 0.15, dtype=torch.float64)
    true = float(_frechet(torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64), mu_b, lb @ lb.T))
    return (
        (lambda n: torch.randn(n, D, generator=g, dtype=torch.float64)),
        (lambda n: mu_b + torch.randn(n, D, generator=g, dtype=torch.float64) @ lb.T),
        true,
    )


def fid_infinity(fa, fb, g) -> float:
    n = len(fa)
    sizes = [n // 4, n // 3, n // 2, 2 * n // 3, n]
    values = [sum(fid(fa[torch.randperm(n, generator=g)[:k]], fb) for _ in range(3)) / 3 for k in sizes]
    x = torch.tensor([1 / k for k in sizes], dtype=torch.float64)
    coef = torch.linalg.lstsq(
        torch.stack([torch.ones_like(x), x], 1), torch.tensor(values, dtype=torch.float64)[:, None]
    )
    return float(coef.solution[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fid-estimators.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    sample_a, sample_b, true = gaussians(g)
    plan = {300: 60, 1000: 40, 10_000: 12} if not args.quick else {300: 15, 1000: 8, 10_000: 3}
    boots = 200
    rows = []
    print(f"true FID {true:.4f} ({D} features, {REAL} real images, {boots} bootstrap draws)")
    print(f"{'N':>6} {'draws':>5} {'estimate':<26}{'bias':>9}{'sd':>8}{'rmse':>8}  coverage of the basic interval")
    for n, draws in plan.items():
        start = time.perf_counter()
        values: dict[str, list[float]] = {"raw": [], "2F - median(F*) (chosen)": [], "2F - mean(F*)": [], "FID-inf": []}
        covered = 0
        for seed in range(draws):
            fa, fb = sample_a(n), sample_b(REAL)
            raw = fid(fa, fb)
            (f_star,) = _fid_boots([(fa, None), (fb, None)], boots, seed)
            q_lo, q_hi = quantiles(f_star, 0.95)
            values["raw"].append(raw)
            values["2F - median(F*) (chosen)"].append(2 * raw - float(f_star.median()))
            values["2F - mean(F*)"].append(2 * raw - float(f_star.mean()))
            values["FID-inf"].append(fid_infinity(fa, fb, g))
            covered += 2 * raw - q_hi <= true <= 2 * raw - q_lo
        for name, v in values.items():
            t = torch.tensor(v, dtype=torch.float64)
            row = {
                "n": n,
                "draws": draws,
                "estimate": name,
                "bias": float(t.mean() - true),
                "sd": float(t.std()),
                "rmse": float(((t - true) ** 2).mean().sqrt()),
                "coverage": covered / draws,
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            cov = f"{covered / draws:.2f}" if name == "raw" else ""
            print(
                f"{n:>6} {draws:>5} {name:<26}{row['bias']:>+9.3f}{row['sd']:>8.3f}{row['rmse']:>8.3f}  {cov}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"true_fid": true, "features": D, "real": REAL, "bootstrap_draws": boots, "rows": rows}
    result["machine"] = platform.processor() or platform.machine()
    write_json(args.out, result)  # atomic; a NaN is refused
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
