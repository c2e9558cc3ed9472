"""Where the default run's time goes: `make repro` from a fresh clone, timed end to end and stage by stage.

    .venv/bin/python bench/repro_timing.py                 # clone HEAD into a temp folder, run make repro there
    .venv/bin/python bench/repro_timing.py --keep DIR      # clone into DIR (new) and keep it: its outputs to commit
    .venv/bin/python bench/repro_timing.py --log FILE      # read a log already stamped "EPOCH LINE" instead

The clone's output is stamped line by line with the second it arrived. A stage's time runs from DVC's
"Running stage 'S':" line to the next stage's (the last stage to the end), so it holds the stage's Python
start-up, its Ray start-up and its MLflow logging as a user waits for them; the set-up (venv install,
Fashion-MNIST) is the time before the first stage. Prints a table; writes bench/results/repro-cpu.json.
32 to 56 minutes on 2 CPU cores, as fast as the machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_core import cpu_model  # noqa: E402
from cdiff.io import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"Running stage '([^']+)'")


def stamped_run(work: Path, log: Path) -> None:
    """Clone HEAD into `work`, run `make repro` there, and write its output to `log`, each line stamped."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive as printed; nothing else differs from a user's run
    with log.open("w") as out:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
        out.write(f"{int(time.time())} start {head}\n")
        proc = subprocess.Popen(
            ["make", "repro"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            out.write(f"{int(time.time())} {line.rstrip()}\n")
            out.flush()
        rc = proc.wait()
        out.write(f"{int(time.time())} end rc={rc}\n")


def stage_times(lines: list[str]) -> dict:
    """(start, stages, end) of a stamped log -> the set-up's, each stage's and the total seconds."""
    stamps = [(int(t), rest) for t, _, rest in (line.partition(" ") for line in lines) if t.isdigit()]
    start, end = stamps[0][0], stamps[-1][0]
    head = stamps[0][1].split()[-1]
    ok = stamps[-1][1].startswith("end rc=0")
    marks = [(t, m.group(1)) for t, text in stamps if (m := RUNNING.search(text))]
    if not marks:
        raise SystemExit('no "Running stage" line in the log: is it the output of dvc repro?')
    stages = {name: nxt - t for (t, name), (nxt, _) in zip(marks, marks[1:] + [(end, "")], strict=True)}
    return {"commit": head, "exit_ok": ok, "setup_s": marks[0][0] - start, "stages_s": stages, "total_s": end - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, help="a stamped log to read instead of running (EPOCH LINE per line)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "repro-cpu.json")
    parser.add_argument("--keep", type=Path, help="clone into this new folder and keep it (the log beside it)")
    args = parser.parse_args()
    if args.keep is not None:
        if args.keep.exists():
            raise SystemExit(f"{args.keep} exists: name a new folder")
        args.keep.mkdir(parents=True)
        log = args.keep / "repro.log"
        stamped_run(args.keep / "clone", log)
        timing = stage_times(log.read_text().splitlines())
    elif args.log is None:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "repro.log"
            stamped_run(Path(tmp) / "clone", log)
            timing = stage_times(log.read_text().splitlines())
    else:
        timing = stage_times(args.log.read_text().splitlines())
    groups: dict[str, float] = {}
    for name, s in timing["stages_s"].items():
        group = name.split("@")[0]
        groups[group] = groups.get(group, 0) + s
    total = timing["total_s"]
    print(f"{'stage':28s} {'seconds':>8s} {'share':>7s}")
    print(f"{'set-up (venv, data)':28s} {timing['setup_s']:8d} {timing['setup_s'] / total:7.1%}")
    for name, s in sorted(timing["stages_s"].items(), key=lambda kv: -kv[1]):
        print(f"{name:28s} {s:8d} {s / total:7.1%}")
    print(f"{'total':28s} {total:8d}  ({total / 60:.1f} min, exit {'ok' if timing['exit_ok'] else 'FAILED'})")
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        **timing,
        "by_stage_kind_s": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
