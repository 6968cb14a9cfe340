"""Inference speed per model family on this machine: images per second through ``apis.inference_detector``.

    python -m benchmarks.bench_infer --json docs/bench_infer.json            # the table of docs/models.md
    python -m benchmarks.bench_infer --images 2 --models fcos_resnet50_fpn   # quicker

Each family's torchvision builder (via detpipe.models.build_model, no weights: untrained heads, so the number of
detections, and with it the post-processing time, is not that of a trained model), 91 classes as COCO, at the
family's default input size (R50-FPN models: short side 800, long side at most 1333; SSD300: 300x300;
SSDlite: 320x320). The input is a 640x480 photo-like picture, batch 1, after one warm-up image. The time is
``result.seconds``: from the decoded picture to results on the host (model resize and post-processing included).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import threading

import numpy as np
import torch
from PIL import Image

from detpipe import apis, engine
from detpipe.models import build_model

MODELS = {  # name -> the input size it runs at
    "fasterrcnn_resnet50_fpn": "800-1333", "maskrcnn_resnet50_fpn": "800-1333", "retinanet_resnet50_fpn": "800-1333",
    "fcos_resnet50_fpn": "800-1333", "ssd300_vgg16": "300x300", "ssdlite320_mobilenet_v3_large": "320x320",
}


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")),
                platform.processor())


def picture(width: int = 640, height: int = 480) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], -1) * 180
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def bench(name: str, image: Image.Image, images: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(name, "resnet50", 91, min_size=800, max_size=1333).to(device).eval()
    model.meta, model.device, model.lock = {"classes": [f"class{k}" for k in range(1, 91)]}, device, threading.Lock()
    apis.inference_detector(model, image)  # warm-up
    seconds = [apis.inference_detector(model, image).seconds for _ in range(images)]
    return {"model": name, "input_size": MODELS[name], "images": images,
            "img_per_s": round(images / sum(seconds), 3), "median_s_per_img": round(statistics.median(seconds), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--images", type=int, default=3, help="timed images per model (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: every core)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    engine.set_threads(args.threads)
    device = engine.resolve_device(args.device)
    rows = [bench(name, picture(), args.images, device) for name in args.models]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"{where}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, batch 1, 640x480 input")
    print("| model | input size | img/s | median s/img |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['input_size']} | {r['img_per_s']:.2f} | {r['median_s_per_img']:.3f} |")
    if args.json:
        setup = {"device": str(device), "processor": where, "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "python": platform.python_version(), "batch": 1,
                 "input": "640x480 RGB", "warmup_images": 1, "timed_images": args.images}
        with open(args.json, "w") as f:
            f.write(json.dumps({"setup": setup, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
