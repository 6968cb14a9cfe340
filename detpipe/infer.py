"""Inference on an image, a folder of images, a video file or a camera: annotated copies plus detections.json.

The tutorial's demos (image, video, webcam) as one command, ``stages/infer.py``; not a pipeline stage. Every
input problem is found before anything is written, and the output folder is written whole (atomic_dir), so a
failed or cancelled run leaves no partial output. Ctrl-C on a camera stops the recording and keeps it.
Video goes through OpenCV (``cv2``, imported only when a video or camera is read: it is heavy).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detpipe import apis
from detpipe.errors import DetpipeError, check_terminated
from detpipe.files import atomic_dir, check_output_folder, write_text
from detpipe.images import read_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
DETECTIONS = "detections.json"
WRITERS = (("mp4v", ".mp4"), ("MJPG", ".avi"))  # tried in order: what every OpenCV wheel can write and read
CAMERA_FPS = 30.0  # when a camera does not report its rate


@dataclass(frozen=True)
class Source:
    """What ``--input`` names: ``kind`` is image, folder, video or camera."""

    kind: str
    path: Path | None = None
    images: tuple[Path, ...] = ()
    camera: int | None = None

    @property
    def stem(self) -> str:
        return f"camera{self.camera}" if self.kind == "camera" else self.path.stem

    def describe(self) -> str:
        return f"camera {self.camera}" if self.kind == "camera" else str(self.path)


def find_source(input: str | Path) -> Source:
    """Classify ``input``: an existing path by its type and suffix, else a camera index (an integer)."""
    path = Path(input)
    if path.is_dir():
        images = tuple(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        if not images:
            raise DetpipeError(f"{path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return Source("folder", path, images)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return Source("image", path, (path,))
        if suffix in VIDEO_SUFFIXES:
            return Source("video", path)
        raise DetpipeError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) "
                           f"or a video ({', '.join(VIDEO_SUFFIXES)})")
    if str(input).strip().isdigit():
        return Source("camera", camera=int(str(input)))
    raise DetpipeError(f"{path}: input does not exist (give an image, a folder, a video or a camera index)")


def _cv2():
    """OpenCV, quiet: its and FFmpeg's warnings would bury the one-line error (set the variables to see them)."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    import cv2

    return cv2


def _open_capture(source: Source):
    """An opened ``cv2.VideoCapture`` and its first frame (BGR); one-line errors for what cannot be read."""
    cv2 = _cv2()
    capture = cv2.VideoCapture(source.camera if source.kind == "camera" else str(source.path))
    ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        if source.kind == "camera":
            raise DetpipeError(f"camera {source.camera}: cannot open it or read a frame (is it connected, "
                               "and free? list them with: ls /dev/video*)")
        raise DetpipeError(f"{source.path}: unreadable video (no frame could be decoded)")
    return capture, first


@contextlib.contextmanager
def _ctrl_c_stops(live: bool) -> Iterator[threading.Event]:
    """For a camera, the first Ctrl-C sets the returned event (recording ends after the current batch, and is
    kept); a second one aborts as usual (a camera that hangs in read)."""
    stop = threading.Event()
    if not live or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("stopping after the current frames (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _frames(capture, first, max_frames: int | None, stop: threading.Event) -> Iterator[np.ndarray]:
    """RGB frames until the stream ends, ``max_frames`` were read, or ``stop`` is set."""
    cv2 = _cv2()
    frame, n = first, 0
    while not stop.is_set():
        yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        n += 1
        if max_frames is not None and n >= max_frames:
            return
        ok, frame = capture.read()
        if not ok:
            return


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        check_terminated()  # a SIGTERM whose KeyboardInterrupt a finaliser swallowed (detpipe.errors)
        yield batch


def _record(result: apis.DetResult, score_thr: float) -> dict:
    """One image's detections at or above ``score_thr``, best first, as JSON (masks as COCO RLE)."""
    rows = [(float(det[4]), k, det, j) for k, dets in enumerate(result) for j, det in enumerate(dets)
            if det[4] >= score_thr]
    rows.sort(key=lambda r: -r[0])
    record = {"boxes": [[round(float(v), 2) for v in det[:4]] for _, _, det, _ in rows],
              "scores": [round(s, 4) for s, *_ in rows],
              "labels": [k for _, k, _, _ in rows],
              "class_names": [result.class_names[k] for _, k, _, _ in rows]}
    if result.masks is not None:
        from pycocotools import mask as mask_utils

        record["masks"] = []
        for _, k, _, j in rows:
            rle = mask_utils.encode(np.asfortranarray(result.masks[k][j].astype(np.uint8)))
            record["masks"].append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return record


def _detections_json(header: dict, records: list[dict]) -> str:
    """Pretty at the top, one line per image or frame: readable, diffable, and small for a long video."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
    results = ",\n".join(f"  {json.dumps(r, separators=(',', ':'))}" for r in records)
    return "{\n" + "\n".join(lines) + '\n "results": [\n' + results + "\n ]\n}\n"


def _annotate_images(model, source: Source, tmp: Path, score_thr: float, batch_size: int) -> tuple[list[dict], float]:
    """Records of every image, and the seconds spent in inference_detector."""
    records, model_seconds = [], 0.0
    for batch in _batches(source.images, batch_size):
        pictures = [read_rgb(p) for p in batch]
        results = apis.inference_detector(model, pictures)
        model_seconds += results[0].seconds
        for path, picture, result in zip(batch, pictures, results):
            apis.show_result(picture, result, score_thr, out_file=tmp / path.name)
            records.append({"file": path.name, "width": picture.width, "height": picture.height,
                            **_record(result, score_thr)})
    return records, model_seconds


def _open_writer(folder: Path, stem: str, fps: float, size: tuple[int, int]):
    cv2 = _cv2()
    for fourcc, suffix in WRITERS:
        writer = cv2.VideoWriter(str(folder / f"{stem}{suffix}"), cv2.VideoWriter_fourcc(*fourcc), fps, size)
        if writer.isOpened():
            return writer, f"{stem}{suffix}"
        writer.release()
        (folder / f"{stem}{suffix}").unlink(missing_ok=True)
    raise DetpipeError(f"this OpenCV build cannot write video ({', '.join(f for f, _ in WRITERS)}); "
                       "reinstall opencv-python-headless")


def _annotate_stream(model, source: Source, capture, first, tmp: Path, score_thr: float, batch_size: int,
                     max_frames: int | None) -> tuple[list[dict], str, float, float]:
    """Every frame annotated into one video of the input's rate and size; returns records, video name, its fps
    and the seconds spent in inference_detector."""
    cv2 = _cv2()
    fps = capture.get(cv2.CAP_PROP_FPS)
    if not math.isfinite(fps) or not 0 < fps <= 1000:
        fps = CAMERA_FPS
    height, width = first.shape[:2]
    writer, name = _open_writer(tmp, source.stem, fps, (width, height))
    records, model_seconds = [], 0.0
    try:
        with _ctrl_c_stops(source.kind == "camera") as stop:
            for batch in _batches(_frames(capture, first, max_frames, stop), batch_size):
                results = apis.inference_detector(model, batch)
                model_seconds += results[0].seconds
                for frame, result in zip(batch, results):
                    picture = apis.show_result(frame, result, score_thr)
                    writer.write(cv2.cvtColor(np.asarray(picture), cv2.COLOR_RGB2BGR))
                    records.append({"frame": len(records), "width": width, "height": height,
                                    **_record(result, score_thr)})
    finally:
        writer.release()
    return records, name, fps, model_seconds


def run(checkpoint, input, out, *, score_thr: float = 0.3, device: str = "auto", batch_size: int = 1,
        max_frames: int | None = None) -> dict:
    """Detect objects in ``input`` (image, folder, video or camera index) with a train-stage checkpoint.

    Writes into ``out`` the annotated images (same names) or video (``<stem>.mp4``, every frame, same rate
    and size) and ``detections.json``; prints the throughput: of the whole run (reading, inference, drawing,
    writing) and of the model alone (``inference_detector``'s time, also in the ``detections.json`` header).
    Returns a summary (frames, seconds, rate, model_seconds, model_rate, outputs).
    """
    if not 0 <= score_thr <= 1:
        raise DetpipeError(f"--score-thr: must be between 0 and 1, got {score_thr}")
    if batch_size < 1:
        raise DetpipeError(f"--batch-size: must be at least 1, got {batch_size}")
    if max_frames is not None and max_frames < 1:
        raise DetpipeError(f"--max-frames: must be at least 1, got {max_frames}")
    source = find_source(input)
    out = Path(out)
    check_output_folder(out, DETECTIONS, "infer", {"the input": source.path})
    model = apis.init_detector(None, checkpoint, device=device)
    capture = first = None
    if source.kind in ("video", "camera"):
        capture, first = _open_capture(source)
    started = time.perf_counter()
    summary = {"input": source.describe(), "kind": source.kind}
    try:
        with atomic_dir(out) as tmp:
            if capture is None:
                records, model_seconds = _annotate_images(model, source, tmp, score_thr, batch_size)
            else:
                records, video, fps, model_seconds = _annotate_stream(model, source, capture, first, tmp, score_thr,
                                                                      batch_size, max_frames)
                summary.update(video=video, fps=fps)
            model_rate = len(records) / model_seconds if model_seconds > 0 else float("inf")
            header = {**summary, "checkpoint": str(checkpoint), "score_thr": score_thr,
                      "classes": model.meta["classes"], "batch_size": batch_size, "device": str(model.device),
                      "model_seconds": round(model_seconds, 4), "model_fps": round(model_rate, 3)}
            write_text(tmp / DETECTIONS, _detections_json(header, records))
    finally:
        if capture is not None:
            capture.release()
    seconds = time.perf_counter() - started
    n = len(records)
    unit = ("image" if capture is None else "frame") + ("" if n == 1 else "s")
    rate = n / seconds if seconds > 0 else float("inf")
    wrote = f"{out / summary['video']} and {out / DETECTIONS}" if "video" in summary else \
        f"{n} annotated {unit} and {DETECTIONS} into {out}"
    per = f"{unit.rstrip('s')}s/s"
    print(f"{n} {unit} in {seconds:.2f} s: {rate:.2f} {per} on {model.device} (model alone: {model_rate:.2f} {per}, "
          f"batch {batch_size}); wrote {wrote}", flush=True)
    return {**summary, "out": str(out), "frames": n, "seconds": seconds, "rate": rate,
            "model_seconds": model_seconds, "model_rate": model_rate}
