"""One call that checks the CUDA path of the train and evaluate stages: AMP with bfloat16 and with float16
(gradient scaler), DistributedDataParallel with one process under torchrun, and the speed levers that change the
model's code (``sync_free_inputs``, ``sync_free_loss``, ``parallel_rpn`` on Faster R-CNN, with DataLoader workers
kept and forked anew each epoch beside its threads).

    python -m benchmarks.gpu_check --json gpu_check.json            # on a machine with a GPU
    python -m benchmarks.gpu_check --device cpu                      # the same steps on the CPU (AMP is ignored)

Works in a scratch copy of the project on a small generated dataset; each case runs the real stage scripts
(`stages/download.py`, `convert.py`, `train.py`, `evaluate.py`) and reports exit status, the training speed of
the last epoch, peak GPU memory where there is a GPU, and bbox_mAP_50. On the lent GPU machine, install the
wheels of ../shared/gpu/fetch-wheels first (MLflow and pycocotools are not in its image).
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

import yaml

CASES = {  # name -> overrides of the train stage, and whether it runs under torchrun
    "fp32": ([], False),
    "amp-bf16": (["train.amp=true", "train.amp_dtype=bfloat16", "train.sync_free_inputs=false"], False),
    "amp-fp16-scaler": (["train.amp=true", "train.amp_dtype=float16"], False),
    "ddp-1-process": (["train.amp=true"], True),
    # the GPU speed levers that change the model's code, in the stages themselves (bf16)
    "sync-free": (["train.amp=true", "train.sync_free_inputs=true", "train.sync_free_loss=true"], False),
    "fasterrcnn-levers": (["model.name=fasterrcnn", "train.amp=true", "train.parallel_rpn=true",
                           "train.sync_free_inputs=true", "train.num_workers=4", "train.persistent_workers=true"],
                          False),
    # the same with workers forked again each epoch while parallel_rpn's thread pool is alive
    "fasterrcnn-levers-forked": (["model.name=fasterrcnn", "train.amp=true", "train.parallel_rpn=true",
                                  "train.sync_free_inputs=true", "train.num_workers=4",
                                  "train.persistent_workers=false"], False),
}


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=64, help="generated train images (val: a quarter)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="default: all")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    src = Path.cwd()
    py = sys.executable
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("detpipe", "stages", "params", "workflow"):
            shutil.copytree(src / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        registry = yaml.safe_load((root / "params/datasets.yaml").read_text())
        registry["synthetic"]["generate"].update(num_train=args.images, num_val=max(4, args.images // 4))
        (root / "params/datasets.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
               "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}"}
        for stage in ("download", "convert"):
            done = run([py, f"stages/{stage}.py"], root, env)
            if done.returncode:
                sys.exit(f"{stage} failed:\n{done.stderr[-2000:]}")
        common = ["--set", f"device={args.device}", "--set", f"train.epochs={args.epochs}"]
        for case in args.cases:
            overrides, torchrun = CASES[case]
            out = f"runs/{case}"
            sets = [a for o in overrides for a in ("--set", o)]
            train = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else [py]
            start = time.time()
            trained = run([*train, "stages/train.py", "--out", out, *common, *sets], root, env)
            row = {"case": case, "train_exit": trained.returncode, "train_s": round(time.time() - start, 1)}
            if trained.returncode == 0:
                with open(root / out / "train_log.csv") as f:
                    last = list(csv.DictReader(f))[-1]
                row["img_per_s_last_epoch"] = round(float(last["train/img_per_s"]), 1)
                row["device"] = json.loads((root / out / "run.json").read_text())["device"]
                evaluated = run([py, "stages/evaluate.py", "--model", out, "--out", f"{out}-eval", *common], root, env)
                row["evaluate_exit"] = evaluated.returncode
                if evaluated.returncode == 0:
                    row["bbox_mAP_50"] = json.loads((root / f"{out}-eval/metrics.json").read_text())["bbox_mAP_50"]
            else:
                row["error"] = trained.stderr.strip().splitlines()[-1:] or ["(no output)"]
            results.append(row)
            print(json.dumps(row), flush=True)
    import torch

    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(f"\n{'case':<18}{'train':>7}{'s':>8}{'img/s':>8}{'eval':>6}{'mAP_50':>8}")
    for r in results:
        print(f"{r['case']:<18}{r['train_exit']:>7}{r['train_s']:>8}{r.get('img_per_s_last_epoch', '-'):>8}"
              f"{r.get('evaluate_exit', '-'):>6}{r.get('bbox_mAP_50', float('nan')):>8.3f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "device": args.device, "results": results}, indent=1))
    sys.exit(0 if all(r["train_exit"] == 0 and r.get("evaluate_exit") == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
