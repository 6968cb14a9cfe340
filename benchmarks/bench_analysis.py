"""Benchmark the evaluate stage's analyses (detpipe.analysis) against its COCO scoring, on generated data.

    python -m benchmarks.bench_analysis --images 500 --json docs/bench_analysis.json

A generated val set (``--images`` images of 640x480, 1-15 objects each of 20 classes, a few crowd boxes) and
about 50 detections per image (shifted copies of the objects, some with the wrong class, and strays, scores
uniform) are scored by :func:`detpipe.metrics.coco_evaluate` with each backend, and analysed by
:func:`detpipe.analysis.analyse` plus the writing of ``analysis.json`` and ``plots/``. Each is timed as the best
of ``--repeat`` runs; the ratio is the analyses' time over the COCO scoring's.

With ``--predict`` the stage's other step is timed too: the default params' model (untrained: the time does not
depend on the weights) predicts on as many generated synthetic val images, and the analyses are also given as a
share of prediction + COCO scoring + analyses (the stage without its start-up, so the share is an upper bound).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from detpipe import analysis, config, metrics
from detpipe.files import write_json

CLASSES = [f"class{k}" for k in range(20)]


def make_data(n_images: int, dets_per_image: int, seed: int) -> tuple[dict, list[dict]]:
    rng = random.Random(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480})
        objects = []
        for _ in range(rng.randint(1, 15)):
            w, h = rng.uniform(16, 200), rng.uniform(16, 160)
            box = [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h]
            crowd = rng.random() < 0.02
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": rng.randrange(len(CLASSES)) + 1,
                         "bbox": box, "area": w * h, "iscrowd": int(crowd)})
            objects.append(anns[-1])
        for _ in range(dets_per_image):
            if rng.random() < 0.6:
                a = rng.choice(objects)
                x, y, w, h = a["bbox"]
                box = [x + rng.gauss(0, w / 8), y + rng.gauss(0, h / 8), w * rng.uniform(0.7, 1.3),
                       h * rng.uniform(0.7, 1.3)]
                cat = a["category_id"] if rng.random() < 0.85 else rng.randrange(len(CLASSES)) + 1
            else:
                w, h = rng.uniform(16, 200), rng.uniform(16, 160)
                box, cat = [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h], rng.randrange(len(CLASSES)) + 1
            dets.append({"image_id": i, "category_id": cat, "bbox": [round(v, 2) for v in box],
                         "score": round(rng.random(), 4)})
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def best_of(repeat: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def time_predict(n_images: int) -> float:
    import torch  # heavy: only for --predict

    from detpipe import engine, synthetic
    from detpipe.conversion import convert_dataset
    from detpipe.datasets import CocoDetection
    from detpipe.models import build_from_params

    cfg = config.load()
    with tempfile.TemporaryDirectory() as tmp:
        raw, coco = Path(tmp) / "raw", Path(tmp) / "coco"
        synthetic.generate(raw, num_train=0, num_val=n_images, image_size=128, max_objects=4, seed=0)
        convert_dataset("via", raw, coco, list(synthetic.CLASSES), splits={"val": "val"})
        dataset = CocoDetection(coco / "val.json", raw)
        model = build_from_params(cfg.model, len(dataset.class_names))
        engine.set_threads(cfg.threads)
        start = time.perf_counter()
        with torch.inference_mode():
            engine.predict(model, dataset, torch.device("cpu"), cfg.evaluate.batch_size, cfg.evaluate.score_thr)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dets-per-image", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--predict", action="store_true", help="also time the default model's prediction")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    gt, dets = make_data(args.images, args.dets_per_image, args.seed)
    coco_s = {b: best_of(args.repeat, lambda b=b: metrics.coco_evaluate(gt, dets, "bbox", b))[0]
              for b in metrics.BACKENDS}
    analyse_s, result = best_of(args.repeat, lambda: analysis.analyse(gt, dets))
    with tempfile.TemporaryDirectory() as tmp:
        write_s, _ = best_of(args.repeat, lambda: (write_json(Path(tmp) / "analysis.json", result),
                                                   analysis.write_plots(Path(tmp) / "plots", result)))
    extra = analyse_s + write_s
    figures = {
        "images": args.images, "annotations": len(gt["annotations"]), "detections": len(dets),
        "classes": len(CLASSES), "python": platform.python_version(), "machine": platform.machine(),
        "coco_evaluate_s": {b: round(s, 4) for b, s in coco_s.items()},
        "analyse_s": round(analyse_s, 4), "write_s": round(write_s, 4), "analyses_s": round(extra, 4),
        "ratio_to_coco_evaluate": {b: round(extra / s, 3) for b, s in coco_s.items()},
        "voc_mAP_50": round(result["mAP_50"], 4),
    }
    if args.predict:
        figures["predict_s"] = round(time_predict(args.images), 2)
        figures["share_of_stage"] = {b: round(extra / (figures["predict_s"] + s + extra), 4)
                                     for b, s in coco_s.items()}
        print(f"prediction ({args.images} synthetic images, default model, CPU): {figures['predict_s']:.1f} s")
        for b, r in figures["share_of_stage"].items():
            print(f"analyses' share of prediction + scoring ({b}) + analyses: {r:.2%}")
    for b, s in coco_s.items():
        print(f"coco_evaluate ({b}): {s:.3f} s")
    print(f"analyses: {extra:.3f} s (analyse {analyse_s:.3f} s, writing {write_s:.3f} s)")
    for b, r in figures["ratio_to_coco_evaluate"].items():
        print(f"ratio to coco_evaluate ({b}): {r:.1%}")
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
