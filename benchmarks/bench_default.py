"""Benchmark the default pipeline: wall time and peak memory of each stage, and the metrics reached.

    python -m benchmarks.bench_default --json docs/bench_default.json

Runs the five stage scripts in order on the current params inside a scratch copy of the project (so
the workspace and its MLflow store are untouched), prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from detpipe.pipeline import STAGES


def run_stages(root: Path) -> list[dict]:
    rows = []
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for name, stage in STAGES.items():
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(stage.cmd.split(), cwd=root, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows.append({"stage": name, "wall_s": round(time.perf_counter() - start, 1),
                     "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
                     "peak_rss_mb": round(after.ru_maxrss / 1024)})  # a high-water mark over all children so far
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    src = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("detpipe", "stages", "params"):
            shutil.copytree(src / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        rows = run_stages(root)
        metrics = json.loads((root / "runs/eval/metrics.json").read_text())
        history = (root / "runs/train/train_log.csv").read_text().splitlines()
    total = round(sum(r["wall_s"] for r in rows), 1)
    print(f"{'stage':<10}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['stage']:<10}{r['wall_s']:>8}{r['cpu_s']:>8}{r['peak_rss_mb']:>13}")
    print(f"{'total':<10}{total:>8}")
    for t in ("bbox", "segm"):
        if f"{t}_mAP" in metrics:
            print("  ".join(f"{t}_{k} {metrics[f'{t}_{k}']:.3f}" for k in ("mAP", "mAP_50", "mAP_75")))
    import torch

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
                          else None},
              "stages": rows, "total_wall_s": total, "metrics": metrics, "train_log": history,
              "params": (src / "params/detpipe.yaml").read_text()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
