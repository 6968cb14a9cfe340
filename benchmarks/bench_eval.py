"""Benchmark COCO evaluation: pycocotools against the default backend, and detpipe's own work around them.

    nice -n 19 python -m benchmarks.bench_eval --json docs/bench_eval.json

A seeded COCO-style set (5,000 640x480 images, 80 classes, 2-12 objects per image of every area range,
2 % crowd regions, 100 detections per image: jittered copies of 90 % of the objects and random false
positives, as the model hands them to ``engine.predict``) is scored by each backend as
:func:`detpipe.metrics.coco_evaluate` runs it. The library's time: load the ground truth and the results
files, evaluate, accumulate, summarize. The stats, the precision/recall/scores arrays and the per-class
APs of both backends must be identical, and ``predictions.json`` the same bytes however it is made (exit
status 1 if not).

As the evaluate stage works: while the model predicts, each batch of ``--batch`` images becomes columns
(:class:`detpipe.metrics.Detections`), COCO result dicts and the next part of ``predictions.json``
(:class:`detpipe.metrics.ResultsFile`), timed over all batches; once the model is done, the library reads that
file and the split's COCO file as the convert stage wrote it (written here untimed), and detpipe's own work
around it is the per-class AP table and the stage's other COCO files (``per_class.csv``, ``metrics.json``), as
a share of the library's time. For comparison, the same work done once the model is done, as before
2026-11-27: all detections made result dicts at once (or one detection at a time, before that) and written.
End to end from the model's outputs (each way from a clean heap, the collector's deferred work included), with
the stage's VOC analysis, and the memory each way holds (tracemalloc, in untimed runs). The fast steps are the
best of ``--repeats`` runs; pycocotools runs once.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import platform
import tempfile
import time
import tracemalloc
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


def stage_files(out: Path, results: dict, dets) -> None:
    """The evaluate stage's COCO outputs besides predictions.json, written as detpipe/evaluate.py writes them."""
    evaluate_stage._per_class_csv(out / "per_class.csv", results)
    write_json(out / "metrics.json", {**metrics.named_stats(results), "num_detections": len(dets)})


def while_predicting(outputs: list[tuple], cat_ids: list[int], path: Path, batch: int) -> metrics.Detections:
    """What ``engine.predict`` does with each batch of the model's outputs: columns, result dicts, the file."""
    parts = []
    with metrics.ResultsFile(path) as f:
        for start in range(0, len(outputs), batch):
            parts.append(metrics.Detections.from_outputs(outputs[start:start + batch], cat_ids))
            f.add_detections(parts[-1])
    return metrics.Detections.concat(parts)


def at_once(outputs: list[tuple], cat_ids: list[int], path: Path, batch: int) -> list[dict]:
    """As before 2026-11-27 (this session): every image's result dicts made once the model is done, then written."""
    dets = metrics.Detections.from_outputs(outputs, cat_ids).results()
    metrics.write_json_bytes(path, dets)
    return dets


def one_by_one(outputs: list[tuple], cat_ids: list[int], path: Path, batch: int) -> list[dict]:
    """As before that: one detection at a time, then written."""
    dets = results_one_by_one(outputs, cat_ids)
    metrics.write_json_bytes(path, dets)
    return dets


def from_outputs(make, outputs: list[tuple], cat_ids: list[int], gt: dict, gt_file: Path, folder: Path,
                 batch: int) -> None:
    """The evaluate stage's work from the model's outputs, end to end: ``predictions.json`` as ``make`` writes it,
    the library with the per-class table, the other files, the VOC analysis."""
    dets = make(outputs, cat_ids, folder / "predictions.json", batch)
    results = metrics.coco_evaluate(gt, dets, "bbox", FAST, files=(gt_file, folder / "predictions.json"))
    stage_files(folder, {"bbox": results}, dets)
    analyse(gt, dets)


def end_to_end(repeats: int, make, *args) -> tuple[float, float, None]:
    def run():
        gc.collect()  # each run from a clean heap
        return timed(from_outputs, make, *args)
    return min((run() for _ in range(repeats)), key=lambda r: r[0])


def peak_mib(fn, *args) -> float:
    """The most memory Python allocations held during ``fn`` beyond what they held before (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


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
    p.add_argument("--batch", type=int, default=8, help="images per prediction batch (evaluate.batch_size)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each fast step (the fastest counts)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    _, gen_s, (gt, outputs) = timed(make_set, args.images, args.dets, args.classes, args.seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    t, mib = {}, {}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    ways = {"end_to_end": while_predicting, "end_to_end_at_once": at_once, "end_to_end_one_by_one": one_by_one}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = tmp / "val.json", tmp / "predictions.json"
        metrics.write_json_bytes(files[0], gt)  # the convert stage's file
        (tmp / "e2e").mkdir()
        for key, make in ways.items():  # first, while the heap holds no more than the inputs
            *t[key], _ = end_to_end(args.repeats, make, outputs, cat_ids, gt, files[0], tmp / "e2e", args.batch)
            mib[key] = peak_mib(from_outputs, make, outputs, cat_ids, gt, files[0], tmp / "e2e", args.batch)
        *t["while_predicting"], dets = best(args.repeats, while_predicting, outputs, cat_ids, files[1], args.batch)
        written = files[1].read_bytes()
        same_file = True
        for make in (at_once, one_by_one):
            make(outputs, cat_ids, tmp / "other.json", args.batch)
            same_file &= (tmp / "other.json").read_bytes() == written
        # the parts of that step, for all images at once
        *t["columns"], _ = best(args.repeats, metrics.Detections.from_outputs, outputs, cat_ids)
        *t["results"], result_dicts = best(args.repeats, dets.results)
        *t["predictions_format"], text = best(args.repeats, orjson.dumps, result_dicts, None,
                                              orjson.OPT_APPEND_NEWLINE)
        *t["predictions_write"], _ = best(args.repeats, (tmp / "bytes.json").write_bytes, text)
        mib["result_dicts"] = peak_mib(dets.results)
        mib["columns"] = sum(getattr(dets, k).nbytes for k in ("image_id", "category_id", "bbox", "score")) / 2**20
        print(f"{args.images} images, {len(gt['annotations'])} objects "
              f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(dets)} detections "
              f"(generated in {gen_s:.1f} s)")
        *t["pycocotools"], slow = timed(metrics.score_files, *files, "bbox", "pycocotools")
        *t[FAST], fast = best(args.repeats, metrics.score_files, *files, "bbox", FAST)
        *t["per_class"], per_class = best(args.repeats, metrics.per_class_ap, fast, names)
        *t["coco_evaluate"], results = best(args.repeats, lambda: metrics.coco_evaluate(gt, dets, "bbox", FAST,
                                                                                        files=files))
        *t["coco_evaluate_temp_files"], _ = best(args.repeats, metrics.coco_evaluate, gt, result_dicts, "bbox", FAST)
        (tmp / "out").mkdir()
        *t["stage_files"], _ = best(args.repeats, stage_files, tmp / "out", {"bbox": results}, dets)
        *t["voc_analysis"], _ = best(args.repeats, analyse, gt, dets)
        *t["voc_analysis_from_dicts"], _ = best(args.repeats, analyse, gt, result_dicts)
    *t["from_dicts"], _ = min((from_dicts(gt, result_dicts) for _ in range(args.repeats)), key=lambda r: r[0])
    identical = ([float(v) for v in slow.stats] == [float(v) for v in fast.stats]
                 and all(np.array_equal(slow.eval[k], fast.eval[k]) for k in ("precision", "recall", "scores"))
                 and per_class == metrics.per_class_ap(slow, names) and same_file)
    t["own_work"] = [sum(t[k][i] for k in ("per_class", "stage_files")) for i in (0, 1)]
    speedup = [t["pycocotools"][i] / t[FAST][i] for i in (0, 1)]
    share = [100 * t["own_work"][i] / t[FAST][i] for i in (0, 1)]
    share_at_once = [100 * (t["own_work"][i] + t["while_predicting"][i]) / t[FAST][i] for i in (0, 1)]
    per_image_us = [1e6 * t["while_predicting"][i] / args.images for i in (0, 1)]

    rows = [("pycocotools: library s", *t["pycocotools"]),
            (f"{FAST}: library s", *t[FAST]),
            ("**speed-up** (goal >= 15x)", *speedup),
            ("detpipe: per-class AP table s", *t["per_class"]),
            ("detpipe: evaluate stage's other files s (per_class.csv, metrics.json)", *t["stage_files"]),
            ("detpipe's own work around the library s", *t["own_work"]),
            ("**own work / library time** % (goal <= 10 %)", *share),
            (f"while the model predicts: columns, result dicts, predictions.json, batches of {args.batch} s",
             *t["while_predicting"]),
            ("  the same per image, microseconds", *per_image_us),
            ("  of it, for all images at once: columns (rounded) s", *t["columns"]),
            ("  of it: result dicts s", *t["results"]),
            ("  of it: orjson formatting them s", *t["predictions_format"]),
            ("  of it: writing those bytes to a file s", *t["predictions_write"]),
            ("that step and own work / library time, were it done after the model %", *share_at_once),
            (f"check: the whole coco_evaluate call with {FAST}, given the two files s", *t["coco_evaluate"]),
            ("for comparison: coco_evaluate writing both inputs to temporary files s", *t["coco_evaluate_temp_files"]),
            (f"for comparison: {FAST} given the dicts instead of files s", *t["from_dicts"]),
            ("not COCO: the stage's VOC AP and confusion analysis (detpipe.analysis), from the columns s",
             *t["voc_analysis"]),
            ("  the same from the result dicts s", *t["voc_analysis_from_dicts"]),
            ("end to end from the model's outputs: predictions.json batch by batch, library, files, VOC analysis s",
             *t["end_to_end"]),
            ("  the same with every result dict made once the model is done (before) s", *t["end_to_end_at_once"]),
            ("  the same with the dicts made one detection at a time (before that) s", *t["end_to_end_one_by_one"])]
    print("\n| measure | CPU | wall |\n| --- | --- | --- |")
    for name, cpu, wall in rows:
        print(f"| {name} | {cpu:.3g} | {wall:.3g} |")
    print("\nmemory, MiB: " + ", ".join(f"{k} {v:.1f}" for k, v in mib.items()))
    print(f"\n12 stats, precision/recall/scores arrays and per-class AP identical, and predictions.json the same "
          f"bytes made all three ways: {'yes' if identical else 'NO'}; "
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
            "own_work_with_predictions_file_percent": {"cpu": round(share_at_once[0], 1),
                                                       "wall": round(share_at_once[1], 1)},
            "peak_mib": {k: round(v, 3) for k, v in mib.items()}})
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
