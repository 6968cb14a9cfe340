"""Benchmark COCO evaluation: pycocotools against the default backend, and detpipe's own work around them.

    nice -n 19 python -m benchmarks.bench_eval --json docs/bench_eval.json

A seeded COCO-style set (5,000 640x480 images, 80 classes, 2-12 objects per image of every area range,
2 % crowd regions, 100 detections per image: jittered copies of 90 % of the objects and random false
positives, made COCO result dicts by ``engine.predict``'s :func:`detpipe.metrics.coco_results`, timed, and
for comparison one detection at a time, as before: both must agree) is scored by each backend as
:func:`detpipe.metrics.coco_evaluate` runs it. The library's time: load the ground truth and the results
files, evaluate, accumulate, summarize. The stats, the precision/recall/scores arrays and the per-class
APs of both backends must be identical (exit status 1 if not).

detpipe's own work, as a share of the default backend's library time, as the evaluate stage does it: writing
``predictions.json``, which the library then reads together with the split's COCO file as the convert stage
wrote it (written here untimed), the per-class AP table, and the stage's other COCO files (``per_class.csv``,
``metrics.json``); and that share again with the result dicts made from the model's outputs. The fast steps
are the best of ``--repeats`` runs; pycocotools runs once. The whole ``coco_evaluate`` call given the two files
is timed too, as a check, and for comparison the call without them (it writes both inputs to a temporary
folder first, as the train stage's per-epoch validation does).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from detpipe import evaluate as evaluate_stage
from detpipe import metrics
from detpipe.analysis import analyse
from detpipe.files import write_json

FAST = metrics.BACKENDS[0]
WIDTH, HEIGHT = 640, 480


def make_set(num_images: int, dets_per_image: int, num_classes: int, seed: int) -> tuple[dict, list[tuple]]:
    """The ground truth, and each image's detections as the model hands them to ``engine.predict``: (image id,
    float32 boxes x1 y1 x2 y2, float32 scores, labels 1..num_classes)."""
    rng = np.random.default_rng(seed)
    images, annotations, outputs = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": WIDTH, "height": HEIGHT})
        n = int(rng.integers(2, 13))
        wh = np.exp(rng.uniform(np.log(8), np.log(300), (n, 2)))  # small, medium and large objects
        xy = rng.uniform(0, 1, (n, 2)) * ([WIDTH, HEIGHT] - wh)
        cats = rng.integers(1, num_classes + 1, n)
        crowd = rng.random(n) < 0.02
        for (x, y), (w, h), c, k in zip(xy.tolist(), wh.tolist(), cats.tolist(), crowd.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(k)})
        found = rng.random(n) < 0.9
        m = int(found.sum())
        size = np.hstack([wh[found], wh[found]])
        jittered = np.hstack([xy[found], wh[found]]) + rng.uniform(-0.15, 0.15, (m, 4)) * size
        boxes = np.concatenate([jittered, _random_boxes(rng, dets_per_image - m)])
        boxes[:, 2:] += boxes[:, :2]  # x1 y1 x2 y2
        labels = np.concatenate([cats[found], rng.integers(1, num_classes + 1, dets_per_image - m)])
        scores = np.concatenate([rng.uniform(0.3, 1, m), rng.uniform(0.05, 0.8, dets_per_image - m)])
        outputs.append((image_id, boxes.astype(np.float32), scores.astype(np.float32), labels))
    categories = [{"id": k, "name": f"class{k}", "supercategory": "object"} for k in range(1, num_classes + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, outputs


def results_one_by_one(outputs: list[tuple], cat_ids: list[int]) -> list[dict]:
    """For comparison: the same, one detection at a time with Python's round (``engine.predict`` until 2026-11-27)."""
    dets = []
    for image_id, boxes, scores, labels in outputs:
        for j in range(len(scores)):
            x1, y1, x2, y2 = (float(v) for v in boxes[j])
            dets.append({"image_id": image_id, "category_id": cat_ids[int(labels[j]) - 1],
                         "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                         "score": round(float(scores[j]), 4)})
    return dets


def _random_boxes(rng, n: int) -> np.ndarray:
    wh = np.exp(rng.uniform(np.log(8), np.log(300), (n, 2)))
    return np.hstack([rng.uniform(0, 1, (n, 2)) * ([WIDTH, HEIGHT] - wh), wh])


def timed(fn, *args) -> tuple[float, float, object]:
    """CPU seconds of this process (all its threads), wall seconds, and ``fn``'s result."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn(*args)
    return time.process_time() - cpu, time.perf_counter() - wall, result


def best(repeats: int, fn, *args) -> tuple[float, float, object]:
    return min((timed(fn, *args) for _ in range(repeats)), key=lambda r: r[0])


def from_dicts(gt: dict, dets: list[dict]) -> tuple[float, float, None]:
    """For comparison: the default backend given the dicts (copied beforehand, untimed) instead of files."""
    COCO, COCOeval = metrics.library(FAST)
    gt, dets = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}, [dict(d) for d in dets]

    def score():
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

    with contextlib.redirect_stdout(io.StringIO()):
        return timed(score)


def stage_files(out: Path, results: dict, dets: list[dict]) -> None:
    """The evaluate stage's COCO outputs besides predictions.json, written as detpipe/evaluate.py writes them."""
    evaluate_stage._per_class_csv(out / "per_class.csv", results)
    write_json(out / "metrics.json", {**metrics.named_stats(results), "num_detections": len(dets)})


def from_outputs(make, outputs: list[tuple], cat_ids: list[int], gt: dict, gt_file: Path, folder: Path) -> None:
    """The evaluate stage's work after the model, end to end, the collector's deferred work included: the result
    dicts (``make``), predictions.json, the library with the per-class table, the other files, the VOC analysis."""
    dets = make(outputs, cat_ids)
    metrics.write_json_bytes(folder / "predictions.json", dets)
    results = metrics.coco_evaluate(gt, dets, "bbox", FAST, files=(gt_file, folder / "predictions.json"))
    stage_files(folder, {"bbox": results}, dets)
    analyse(gt, dets)


def end_to_end(repeats: int, make, *args) -> tuple[float, float, None]:
    def run():
        gc.collect()  # each run from a clean heap
        return timed(from_outputs, make, *args)
    return min((run() for _ in range(repeats)), key=lambda r: r[0])


def machine() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each fast step (the fastest counts)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    _, gen_s, (gt, outputs) = timed(make_set, args.images, args.dets, args.classes, args.seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    t = {}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = tmp / "val.json", tmp / "predictions.json"
        metrics.write_json_bytes(files[0], gt)  # the convert stage's file
        (tmp / "e2e").mkdir()
        for key, make in (("end_to_end", metrics.coco_results), ("end_to_end_one_by_one", results_one_by_one)):
            # first, while the heap holds no more than the inputs
            *t[key], _ = end_to_end(args.repeats, make, outputs, cat_ids, gt, files[0], tmp / "e2e")
        *t["results"], dets = best(args.repeats, metrics.coco_results, outputs, cat_ids)
        *t["results_one_by_one"], slow_dets = timed(results_one_by_one, outputs, cat_ids)
        same_results = orjson.dumps(slow_dets) == orjson.dumps(dets)  # the predictions.json bytes
        del slow_dets
        print(f"{args.images} images, {len(gt['annotations'])} objects "
              f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(dets)} detections "
              f"(generated in {gen_s:.1f} s)")
        *t["predictions"], _ = best(args.repeats, metrics.write_json_bytes, files[1], dets)
        # the two halves of that step: orjson formatting the detections, and writing its bytes to the file
        *t["predictions_format"], text = best(args.repeats, orjson.dumps, dets, None, orjson.OPT_APPEND_NEWLINE)
        *t["predictions_write"], _ = best(args.repeats, (tmp / "bytes.json").write_bytes, text)
        *t["pycocotools"], slow = timed(metrics.score_files, *files, "bbox", "pycocotools")
        *t[FAST], fast = best(args.repeats, metrics.score_files, *files, "bbox", FAST)
        *t["per_class"], per_class = best(args.repeats, metrics.per_class_ap, fast, names)
        *t["coco_evaluate"], results = best(args.repeats, lambda: metrics.coco_evaluate(gt, dets, "bbox", FAST,
                                                                                        files=files))
        *t["coco_evaluate_temp_files"], _ = best(args.repeats, metrics.coco_evaluate, gt, dets, "bbox", FAST)
        (tmp / "out").mkdir()
        *t["stage_files"], _ = best(args.repeats, stage_files, tmp / "out", {"bbox": results}, dets)
        *t["voc_analysis"], _ = timed(analyse, gt, dets)
    *t["from_dicts"], _ = min((from_dicts(gt, dets) for _ in range(args.repeats)), key=lambda r: r[0])
    identical = ([float(v) for v in slow.stats] == [float(v) for v in fast.stats]
                 and all(np.array_equal(slow.eval[k], fast.eval[k]) for k in ("precision", "recall", "scores"))
                 and per_class == metrics.per_class_ap(slow, names) and same_results)
    t["own_work"] = [sum(t[k][i] for k in ("predictions", "per_class", "stage_files")) for i in (0, 1)]
    t["own_work_with_results"] = [t["own_work"][i] + t["results"][i] for i in (0, 1)]
    speedup = [t["pycocotools"][i] / t[FAST][i] for i in (0, 1)]
    share = [100 * t["own_work"][i] / t[FAST][i] for i in (0, 1)]
    share_with_results = [100 * t["own_work_with_results"][i] / t[FAST][i] for i in (0, 1)]

    rows = [("pycocotools: library s", *t["pycocotools"]),
            (f"{FAST}: library s", *t[FAST]),
            ("**speed-up** (goal >= 15x)", *speedup),
            ("detpipe: writing predictions.json (the library reads it) s", *t["predictions"]),
            ("  of it: orjson formatting the detections s", *t["predictions_format"]),
            ("  of it: writing those bytes to a file s", *t["predictions_write"]),
            ("detpipe: per-class AP table s", *t["per_class"]),
            ("detpipe: evaluate stage's other files s (per_class.csv, metrics.json)", *t["stage_files"]),
            ("detpipe's own work s", *t["own_work"]),
            ("**own work / library time** % (goal <= 10 %)", *share),
            ("detpipe: the model's outputs made COCO result dicts (engine.predict) s", *t["results"]),
            ("  before: one detection at a time (one run) s", *t["results_one_by_one"]),
            ("own work with the result dicts / library time %", *share_with_results),
            (f"check: the whole coco_evaluate call with {FAST}, given the two files s", *t["coco_evaluate"]),
            ("for comparison: coco_evaluate writing both inputs to temporary files s", *t["coco_evaluate_temp_files"]),
            (f"for comparison: {FAST} given the dicts instead of files s", *t["from_dicts"]),
            ("not COCO: the stage's VOC AP and confusion analysis (detpipe.analysis) s", *t["voc_analysis"]),
            ("end to end from the model's outputs: dicts, files, library, VOC analysis s", *t["end_to_end"]),
            ("  the same with the dicts made one detection at a time (before) s", *t["end_to_end_one_by_one"])]
    print("\n| measure | CPU | wall |\n| --- | --- | --- |")
    for name, cpu, wall in rows:
        print(f"| {name} | {cpu:.3g} | {wall:.3g} |")
    print(f"\n12 stats, precision/recall/scores arrays and per-class AP identical, and the result dicts made both "
          f"ways: {'yes' if identical else 'NO'}; "
          f"mAP {fast.stats[0]:.4f}\nmachine: {machine()}, Python {platform.python_version()}")
    if args.json:
        write_json(args.json, {
            "images": args.images, "objects": len(gt["annotations"]), "detections": len(dets),
            "classes": args.classes, "seed": args.seed, "repeats": args.repeats, "machine": machine(),
            "python": platform.python_version(), "identical": identical,
            "stats": dict(zip(metrics.STAT_NAMES, (float(v) for v in fast.stats))),
            "seconds": {k: {"cpu": round(c, 4), "wall": round(w, 4)} for k, (c, w) in t.items()},
            "speedup": {"cpu": round(speedup[0], 2), "wall": round(speedup[1], 2)},
            "own_work_percent": {"cpu": round(share[0], 1), "wall": round(share[1], 1)},
            "own_work_with_results_percent": {"cpu": round(share_with_results[0], 1),
                                              "wall": round(share_with_results[1], 1)}})
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
