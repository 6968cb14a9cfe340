"""Where the default's training iteration spends its CPU time, in NCHW and in NHWC (``train.channels_last``).

    python -m benchmarks.profile_train --json docs/profile_train.json

Generates the default dataset's training images (``params/datasets.yaml``, synthetic), builds the default
params' model, optimizer and schedule as the train stage does, and runs ``engine.train_one_epoch`` over
``--warmup`` iterations and then ``--iters`` iterations under torch.profiler, once with ``channels_last`` off
and once on (each from the same seed). Prints, per layout, the iteration's wall time and the self CPU time of
the costliest operators, with ``aten::max_pool2d_with_indices`` and the convolutions' forward and backward
always listed; writes JSON. One run each on a machine whose speed drifts: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_default import cpu_model
from detpipe import config, engine, synthetic
from detpipe.conversion import convert_dataset
from detpipe.datasets import CocoDetection
from detpipe.files import write_json
from detpipe.models import build_from_params
from detpipe.transforms import train_transforms

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("aten::max_pool2d_with_indices", "aten::mkldnn_convolution", "aten::convolution_backward")


class Limited:
    """The first ``n`` batches of ``loader`` (with its dataset, which train_one_epoch reads)."""

    def __init__(self, loader, n: int):
        self.loader, self.n, self.dataset = loader, n, loader.dataset

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                return
            yield batch


def run(cfg, train_set: CocoDetection, channels_last: bool, warmup: int, iters: int) -> dict:
    t = cfg.train
    engine.set_threads(cfg.threads)
    engine.seed_everything(cfg.seed)
    model = build_from_params(cfg.model, len(train_set.cat_ids))
    engine.speed_up(model, channels_last=channels_last)
    optimizer = engine.build_optimizer(model, t.optimizer, lr=t.lr, momentum=t.momentum,
                                       weight_decay=t.weight_decay, decay_norm_and_bias=t.decay_norm_and_bias)
    scheduler = engine.build_scheduler(optimizer, warmup + iters, t.warmup_iters, t.lr_schedule)
    loader = engine.train_loader(train_set, t.batch_size, 0, engine.seed_everything(cfg.seed), torch.device("cpu"))
    cpu, quiet = torch.device("cpu"), (lambda msg: None)
    engine.train_one_epoch(model, optimizer, scheduler, Limited(loader, warmup), cpu, 1, log=quiet)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        engine.train_one_epoch(model, optimizer, scheduler, Limited(loader, iters), cpu, 2, log=quiet)
        wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    top = events[:8] + [e for e in events[8:] if e.key in WATCHED]
    return {"channels_last": channels_last, "ms_per_iter": round(1000 * wall / iters, 1),
            "self_cpu_ms": {e.key: round(e.self_cpu_time_total / 1000, 1) for e in top}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--images", type=int, help="train images to generate (default: the dataset's own count)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    cfg = config.load(ROOT / "params/detpipe.yaml", [])
    spec = yaml.safe_load((ROOT / "params/datasets.yaml").read_text())["synthetic"]["generate"]
    with tempfile.TemporaryDirectory() as tmp:
        raw, coco = Path(tmp) / "raw", Path(tmp) / "coco"
        synthetic.generate(raw, **{**spec, "num_val": 0, "num_train": args.images or spec["num_train"]})
        convert_dataset("via", raw, coco, list(synthetic.CLASSES), splits={"train": "train"})
        train_set = CocoDetection(coco / "train.json", raw, transforms=train_transforms(cfg.train.hflip, cfg.seed + 1,
                                                                                          cfg.train.scale_range))
        rows = [run(cfg, train_set, cl, args.warmup, args.iters) for cl in (False, True)]
    for row in rows:
        print(f"channels_last {str(row['channels_last']).lower()}: {row['ms_per_iter']} ms per iteration "
              f"(under the profiler); self CPU ms over {args.iters} iterations:")
        for name, ms in row["self_cpu_ms"].items():
            print(f"  {ms:9.1f}  {name}")
    if args.json:
        setup = {"command": "python -m benchmarks.profile_train", "images": args.images or spec["num_train"],
                 "warmup": args.warmup, "iters": args.iters,
                 "cpu": cpu_model(), "torch": torch.__version__,
                 "python": platform.python_version()}
        write_json(args.json, {"setup": setup, "results": rows})


if __name__ == "__main__":
    main()
