"""Benchmark the default pipeline: seconds of each stage, training speed, the metrics, and their spread.

    python -m benchmarks.bench_default --seeds 0 1 2 --avx2 --snakemake --json docs/bench_default.json

Runs the five stage scripts in order on the current params inside a scratch copy of the project (so the
workspace and its MLflow store are untouched), then train + evaluate again for each further seed and, with
``--avx2``, for the first seed (or the seeds it names) on AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``: what another CPU model would run). ``--snakemake``
also times the user's command, ``snakemake --cores 1 report``, from scratch in a second copy. ``--set KEY=VALUE``
tries a param variant without editing the params file (every stage of every run gets it). Prints tables and
writes JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from detpipe.pipeline import STAGES

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
COPY = ("detpipe", "stages", "params", "workflow", "Snakefile")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def scratch_copy(src: Path, dest: Path) -> Path:
    for name in COPY:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src / name, dest / name)
    return dest


def tool_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    """Wall and CPU seconds and the peak RSS of one command (its children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "peak_rss_mb": round(after.ru_maxrss / 1024)}  # a high-water mark over all children so far


def training(root: Path) -> dict:
    """The metrics, the training speed and the val curve of the run in ``root``."""
    metrics = json.loads((root / "runs/eval/metrics.json").read_text())
    with open(root / "runs/train/train_log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    speed = [float(r["train/img_per_s"]) for r in log]
    curve = [round(float(r["val/bbox_mAP_50"]), 4) for r in log if r.get("val/bbox_mAP_50")]
    val_s = sum(float(r["val/seconds"]) for r in log if r.get("val/seconds"))
    with open(root / "runs/eval/per_class.csv", newline="") as f:
        # "": the class has no ground truth in the val split
        per_class = {r["class"]: round(float(r["bbox_AP_50"]), 4) if r["bbox_AP_50"] else None
                     for r in csv.DictReader(f)}
    return {"bbox_mAP": metrics["bbox_mAP"], "bbox_mAP_50": metrics["bbox_mAP_50"], "AP_50_per_class": per_class,
            "train_img_per_s": round(sum(speed) / len(speed), 1), "val_mAP_50_per_epoch": curve,
            "val_share": round(val_s / sum(float(r["train/seconds"]) for r in log), 4),
            **{k: metrics[k] for k in ("segm_mAP", "segm_mAP_50") if k in metrics}}  # mask models


def stage_cmd(name: str, seed: int, overrides: list[str]) -> list[str]:
    """The stage's command as dvc.yaml runs it, with ``seed`` and the ``--set`` overrides."""
    return [*STAGES[name].cmd.split(), *(a for kv in [f"seed={seed}", *overrides] for a in ("--set", kv))]


def run_variant(root: Path, seed: int, kernels: str, overrides: list[str]) -> dict:
    """Train and evaluate again with ``seed`` on ``kernels`` (native or avx2); download and convert are shared."""
    env = tool_env(AVX2 if kernels == "avx2" else None)
    row = {"seed": seed, "kernels": kernels}
    for name in ("train", "evaluate"):
        cmd = stage_cmd(name, seed, overrides)
        row[f"{name}_s"] = timed(cmd, root, env)["wall_s"]
    return {**row, **training(root)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to train (the first also runs the stages)")
    p.add_argument("--avx2", type=int, nargs="*", metavar="SEED",
                   help="also train on AVX2 kernels: these seeds (none named: the first of --seeds)")
    p.add_argument("--snakemake", action="store_true", help="also time `snakemake --cores 1 report` from scratch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="a param override for every stage of every run, as the stages take it (repeatable)")
    p.add_argument("--until", choices=list(STAGES)[3:], default="report",
                   help="the last stage of the first run (evaluate: skip the report)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    if args.overrides and args.snakemake:
        p.error("--snakemake times the params file as it is, without --set: run them separately")
    src = Path.cwd()
    result = {"machine": machine(), "params": (src / "params/detpipe.yaml").read_text(), "overrides": args.overrides}
    with tempfile.TemporaryDirectory() as tmp:
        root = scratch_copy(src, Path(tmp) / "stages")
        env = tool_env()
        stages = []
        for name in STAGES:
            stages.append({"stage": name, **timed(stage_cmd(name, args.seeds[0], args.overrides), root, env)})
            if name == args.until:
                break
        runs = [{"seed": args.seeds[0], "kernels": "native", "train_s": stages[2]["wall_s"],
                 "evaluate_s": stages[3]["wall_s"], **training(root)}]
        print(json.dumps(runs[-1]), flush=True)  # each run as it ends: a run cut short keeps the ones before
        avx2 = [] if args.avx2 is None else args.avx2 or args.seeds[:1]
        variants = [(seed, "native") for seed in args.seeds[1:]] + [(seed, "avx2") for seed in avx2]
        for seed, kernels in variants:
            runs.append(run_variant(root, seed, kernels, args.overrides))
            print(json.dumps(runs[-1]), flush=True)
        if args.snakemake:
            snake_root = scratch_copy(src, Path(tmp) / "snakemake")
            result["snakemake_report_s"] = timed(["snakemake", "--cores", "1", "report"], snake_root, env)["wall_s"]
    values = [r["bbox_mAP_50"] for r in runs]
    result.update(stages=stages, total_wall_s=round(sum(r["wall_s"] for r in stages), 1), runs=runs,
                  spread_mAP_50=round(max(values) - min(values), 4), mean_mAP_50=round(statistics.mean(values), 4),
                  stdev_mAP_50=round(statistics.stdev(values), 4) if len(values) > 1 else None)
    print(f"{'stage':<10}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}")
    for r in stages:
        print(f"{r['stage']:<10}{r['wall_s']:>8}{r['cpu_s']:>8}{r['peak_rss_mb']:>13}")
    print(f"{'total':<10}{result['total_wall_s']:>8}")
    if "snakemake_report_s" in result:
        print(f"snakemake --cores 1 report, from scratch: {result['snakemake_report_s']} s")
    print(f"\n{'seed':>4} {'kernels':<8}{'train s':>9}{'img/s':>7}{'val %':>7}{'mAP':>8}{'mAP50':>8}  "
          "val mAP50 by epoch")
    for r in runs:
        print(f"{r['seed']:>4} {r['kernels']:<8}{r['train_s']:>9}{r['train_img_per_s']:>7}"
              f"{100 * r['val_share']:>7.1f}{r['bbox_mAP']:>8.3f}"
              f"{r['bbox_mAP_50']:>8.3f}  {' '.join(f'{v:.3f}' for v in r['val_mAP_50_per_epoch'])}"
              + (f"  segm mAP {r['segm_mAP']:.3f}, mAP50 {r['segm_mAP_50']:.3f}" if "segm_mAP" in r else ""))
    ranges = {name: [r["AP_50_per_class"][name] for r in runs if r["AP_50_per_class"][name] is not None]
              for name in runs[0]["AP_50_per_class"]}
    print("AP@0.5 per class over the runs: " + "; ".join(
        f"{name} {min(v):.3f}-{max(v):.3f}" if v else f"{name} (no ground truth)" for name, v in ranges.items()))
    sd = "" if result["stdev_mAP_50"] is None else f", standard deviation {result['stdev_mAP_50']:.3f}"
    print(f"bbox mAP@0.5 over the {len(runs)} runs: spread (max - min) {result['spread_mAP_50']:.3f}, mean "
          f"{result['mean_mAP_50']:.3f}{sd}   CPU: {result['machine']['cpu']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


if __name__ == "__main__":
    main()
