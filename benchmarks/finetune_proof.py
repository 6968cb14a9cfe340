"""Prove that fine-tuning works: on a second dataset with other classes, fine-tuned beats from-scratch training.

    python -m benchmarks.finetune_proof --json docs/finetune_proof.json

In a scratch copy of the project (the workspace and its MLflow store are untouched; MLflow logs to a sqlite
file in the scratch folder), with the stage scripts and the current params:

1. pretrain on the default dataset (``synthetic``: circle, square, triangle, cross) and evaluate it;
2. train on ``shapes_b`` (star, hexagon, diamond, pentagon; 200 train / 100 val images) from scratch;
3. train on ``shapes_b`` with ``train.load_from`` = the pretrained ``model.pt``, for the same number of
   epochs and otherwise the same params (the class heads are re-initialised: other classes);

then evaluate 2 and 3 on ``shapes_b``'s val split. Prints a table, and writes the per-epoch val curves
(``train_log.csv``), the final metrics and the load_from line the train stage printed as JSON, with a
plot of the val bbox_mAP_50 curves beside it (``--png``, default: the JSON's name with ``.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = "shapes_b"


class Runner:
    """Runs stage scripts in ``root``, timing each and keeping its stderr in ``root/logs``."""

    def __init__(self, root: Path):
        self.root, self.steps = root, []
        (root / "logs").mkdir()
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}

    def __call__(self, name: str, script: str, *args: str) -> str:
        cmd = [sys.executable, f"stages/{script}.py", *args]
        log = self.root / "logs" / f"{name}.log"
        start = time.perf_counter()
        with open(log, "w") as f:
            result = subprocess.run(cmd, cwd=self.root, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        wall = round(time.perf_counter() - start, 1)
        text = log.read_text()
        if result.returncode:
            sys.exit(f"{name} failed (exit {result.returncode}): {' '.join(cmd[1:])}\n{text[-3000:]}")
        self.steps.append({"step": name, "command": "python " + " ".join(cmd[1:]), "wall_s": wall})
        print(f"  {name:<18}{wall:>8.1f} s", flush=True)
        return text


def read_curve(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)]


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def plot(curves: dict[str, list[dict]], epochs: int, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, ("val/bbox_mAP_50", "val/bbox_mAP"), ("val bbox_mAP_50", "val bbox_mAP")):
        for name, style in (("scratch", "o-"), ("finetune", "s-")):
            rows = [r for r in curves[name] if key in r]
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], style,
                    label={"scratch": "from scratch", "finetune": "fine-tuned (load_from)"}[name])
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_xlim(0.5, epochs + 0.5)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--png", type=Path, help="plot the curves here (default: beside --json, with .png)")
    p.add_argument("--pretrain-epochs", type=int, help="epochs on the default dataset (default: train.epochs)")
    p.add_argument("--epochs", type=int, help=f"epochs on {TARGET}, both runs (default: train.epochs)")
    p.add_argument("--keep", type=Path, help="copy the scratch folder (runs, logs, mlflow.db) here")
    args = p.parse_args()
    src = Path.cwd()
    png = args.png or (args.json.with_suffix(".png") if args.json else None)
    command = "python -m benchmarks.finetune_proof " + " ".join(sys.argv[1:])
    start = time.perf_counter()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="finetune_proof-") as tmp:
        root = Path(tmp)
        for name in ("detpipe", "stages", "params", "workflow/formats"):
            if (src / name).is_dir():
                shutil.copytree(src / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        run = Runner(root)
        pre = [f"--set=train.epochs={args.pretrain_epochs}"] if args.pretrain_epochs else []
        tgt = [f"--set=dataset={TARGET}"] + ([f"--set=train.epochs={args.epochs}"] if args.epochs else [])
        print("pretrain on the default dataset:", flush=True)
        run("download_default", "download", "--out", "data/raw_default")
        run("convert_default", "convert", "--src", "data/raw_default", "--out", "data/coco_default")
        run("train_pretrain", "train", "--data", "data/coco_default", "--images", "data/raw_default",
            "--out", "runs/pretrain", *pre)
        run("evaluate_pretrain", "evaluate", "--data", "data/coco_default", "--images", "data/raw_default",
            "--model", "runs/pretrain", "--out", "runs/eval_pretrain")
        (root / "pretrained").mkdir()
        shutil.copy(root / "runs/pretrain/model.pt", root / "pretrained/shapes.pt")  # outside runs/, as docs say
        print(f"{TARGET}: scratch vs fine-tuned:", flush=True)
        run(f"download_{TARGET}", "download", "--out", "data/raw_b", *tgt)
        run(f"convert_{TARGET}", "convert", "--src", "data/raw_b", "--out", "data/coco_b", *tgt)
        logs = {}
        for name, extra in (("scratch", []), ("finetune", ["--set=train.load_from=pretrained/shapes.pt"])):
            logs[name] = run(f"train_{name}", "train", "--data", "data/coco_b", "--images", "data/raw_b",
                             "--out", f"runs/{name}", *tgt, *extra)
            run(f"evaluate_{name}", "evaluate", "--data", "data/coco_b", "--images", "data/raw_b",
                "--model", f"runs/{name}", "--out", f"runs/eval_{name}", *tgt)
        curves = {name: read_curve(root / f"runs/{name}/train_log.csv") for name in ("pretrain", "scratch", "finetune")}
        metrics = {name: {k.removeprefix("bbox_"): v for k, v in
                          json.loads((root / f"runs/eval_{name}/metrics.json").read_text()).items()
                          if k.startswith("bbox_")} for name in ("pretrain", "scratch", "finetune")}
        loaded = [ln for ln in logs["finetune"].splitlines() if ln.startswith("weights from ")]
        if not loaded:
            sys.exit("the fine-tuning run printed no 'weights from …' line: load_from was not applied")
        if any(ln.startswith("weights from ") for ln in logs["scratch"].splitlines()):
            sys.exit("the scratch run loaded weights: it is not from scratch")
        params = {n: (root / "runs" / n / "config.yaml").read_text() for n in ("pretrain", "scratch", "finetune")}
        stats = json.loads((root / "data/coco_b/stats.json").read_text())
        if args.keep:
            shutil.copytree(root, args.keep, dirs_exist_ok=True)
    wall = round(time.perf_counter() - start, 1)

    epochs = len(curves["scratch"])
    print(f"\nval bbox on {TARGET} per epoch (scratch | fine-tuned):")
    print(f"{'epoch':>5}  {'mAP':>7}{'mAP_50':>8}  | {'mAP':>7}{'mAP_50':>8}")
    nan = float("nan")
    for s, f in zip(curves["scratch"], curves["finetune"]):
        print(f"{s['epoch']:>5}  {s.get('val/bbox_mAP', nan):>7.3f}{s.get('val/bbox_mAP_50', nan):>8.3f}"
              f"  | {f.get('val/bbox_mAP', nan):>7.3f}{f.get('val/bbox_mAP_50', nan):>8.3f}")
    print(f"\nfinal evaluate stage ({TARGET} val, {epochs} epochs each; pretrain on synthetic val):")
    for name in ("pretrain", "scratch", "finetune"):
        m = metrics[name]
        print(f"  {name:<9} mAP {m['mAP']:.3f}  mAP_50 {m['mAP_50']:.3f}  mAP_75 {m['mAP_75']:.3f}")
    gain = {k: round(metrics["finetune"][k] - metrics["scratch"][k], 4) for k in ("mAP", "mAP_50", "mAP_75")}
    print(f"  fine-tuned minus scratch: mAP {gain['mAP']:+.3f}  mAP_50 {gain['mAP_50']:+.3f}  "
          f"mAP_75 {gain['mAP_75']:+.3f}")
    print(f"  {loaded[0][:200]}{'…' if len(loaded[0]) > 200 else ''}")
    print(f"wall time: {wall:.0f} s")

    result = {"command": command, "machine": info, "total_wall_s": wall, "steps": run.steps,
              "pretrain_epochs": len(curves["pretrain"]), "epochs": epochs,
              "target": {"dataset": TARGET, "images": {s: stats["splits"][s]["images"] for s in stats["splits"]},
                         "objects_per_class": {s: stats["splits"][s]["objects_per_class"] for s in stats["splits"]}},
              "load_from_line": loaded[0], "curves": curves, "final_metrics": metrics,
              "finetune_minus_scratch": gain, "params": params}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if png:
        plot(curves, epochs, f"{TARGET} val ({epochs} epochs each): from scratch vs fine-tuned from "
             f"the default dataset ({len(curves['pretrain'])} epochs)", png)


if __name__ == "__main__":
    main()
