"""Inference: the tutorial's calls (init_detector, inference_detector, show_result, the async one) and
stages/infer.py on an image, a folder, a video and a camera, with its one-line errors. Tiny untrained models
whose heads are biased to detect, one CPU thread (two threads on two shared cores run many times slower)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from detpipe import config, infer
from detpipe.apis import async_inference_detector, inference_detector, init_detector, show_result
from detpipe.errors import DetpipeError
from detpipe.models import build_model
from tests.conftest import ROOT, run_stage
from tests.fixtures import make_image

CLASSES = {"fcos": ["circle", "square", "triangle", "cross"], "retinanet": ["car", "person"],
           "fasterrcnn": ["car", "person"], "maskrcnn": ["balloon", "kite"], "ssdlite": ["car", "person"]}
SIZE = {"min_size": 64, "max_size": 64, "fpn_channels": 64}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_checkpoint(path, name: str):
    """A train-stage checkpoint of an untrained tiny model whose heads are biased to find (and mask) objects."""
    torch.manual_seed(0)
    backbone = "mobilenet_v3_large" if name == "ssdlite" else "resnet18"
    classes = CLASSES[name]
    model = build_model(name, backbone, len(classes) + 1, **SIZE)
    state = model.state_dict()
    boosts = {"head.classification_head.cls_logits.bias": 1.0,  # one-stage: scores of about 0.6
              "roi_heads.mask_predictor.mask_fcn_logits.bias": 5.0}  # masks fill their boxes
    for key, value in boosts.items():
        if key in state:
            state[key].fill_(value)
    if "roi_heads.box_predictor.cls_score.bias" in state:
        state["roi_heads.box_predictor.cls_score.bias"][0] = -5.0  # two-stage: not background
    meta = {"model": {"name": name, "backbone": backbone, **SIZE}, "classes": classes,
            "cat_ids": list(range(1, len(classes) + 1))}
    torch.save({"model": state, "meta": meta}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return {name: save_checkpoint(folder / f"{name}.pt", name) for name in ("fcos", "maskrcnn")}


def write_video(path, frames: int = 10, size=(64, 48), fps: float = 10.0, fourcc: str = "mp4v"):
    """A moving white square on grey, written the way the infer stage writes (and checked to read back)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        frame = np.full((size[1], size[0], 3), 90, np.uint8)
        frame[10:30, 4 + 3 * i:24 + 3 * i] = 255
        writer.write(frame)
    writer.release()
    return path


def video_info(path) -> tuple[int, float, tuple[int, int]]:
    capture = cv2.VideoCapture(str(path))
    n = 0
    while capture.read()[0]:
        n += 1
    info = n, capture.get(cv2.CAP_PROP_FPS), (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                                              int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    capture.release()
    return info


def check_records(records, classes, score_thr):
    for r in records:
        n = len(r["boxes"])
        assert n == len(r["scores"]) == len(r["labels"]) == len(r["class_names"])
        assert all(s >= score_thr for s in r["scores"]) and r["scores"] == sorted(r["scores"], reverse=True)
        assert [classes[k] for k in r["labels"]] == r["class_names"]
        assert all(len(b) == 4 and b[0] <= b[2] and b[1] <= b[3] for b in r["boxes"])


# --- the tutorial's calls -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CLASSES))
def test_inference_detector_and_show_result_per_family(name, tmp_path):
    model = init_detector(None, save_checkpoint(tmp_path / "m.pt", name), device="cpu")
    image = make_image(tmp_path / "a.jpg", 80, 60)
    result = inference_detector(model, image)
    assert result.class_names == CLASSES[name] and len(result) == len(CLASSES[name])
    assert all(r.dtype == np.float32 and r.ndim == 2 and r.shape[1] == 5 for r in result)
    assert sum(len(r) for r in result) > 0
    rgb = np.asarray(Image.open(image).convert("RGB"))
    same = [inference_detector(model, rgb), inference_detector(model, Image.fromarray(rgb))]
    for other in same:  # a path, an RGB array and a PIL image are the same input
        assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(result, other))
    batch = inference_detector(model, [image, rgb])  # one forward pass
    assert len(batch) == 2 and all(np.allclose(a, b, atol=1e-3) for a, b in zip(batch[0], result))
    assert result.batch_size == 1 and result.seconds > 0 and result.fps == pytest.approx(1 / result.seconds)
    assert [r.batch_size for r in batch] == [2, 2] and batch[0].seconds == batch[1].seconds > 0  # the batch's time
    assert batch[1].fps == pytest.approx(2 / batch[1].seconds)
    picture = show_result(image, result, score_thr=0.0, out_file=tmp_path / "shown.png")
    assert picture.size == (80, 60) and Image.open(tmp_path / "shown.png").size == (80, 60)
    assert np.any(np.asarray(picture) != rgb)  # something was drawn
    if name == "maskrcnn":
        assert [len(m) for m in result.masks] == [len(r) for r in result]
        masks = [m for per_class in result.masks for m in per_class]
        assert masks and all(m.shape == (60, 80) and m.dtype == bool for m in masks)
        top = max(float(r[:, 4].max()) for r in result if len(r))  # one detection: its mask shows beside the box
        with_mask = show_result(image, result, score_thr=top)
        boxes_only = show_result(image, type(result)(list(result), result.class_names), score_thr=top)
        assert np.any(np.asarray(with_mask) != np.asarray(boxes_only))
    else:
        assert result.masks is None


def test_init_detector_takes_a_runs_config_yaml(ckpts, tmp_path):
    """The train stage saves the resolved params plus the dataset entry under ``data``: that file is a config."""
    cfg = config.load(ROOT / "params/detpipe.yaml", [f"model.{k}={v}" for k, v in SIZE.items()])
    saved = tmp_path / "runs/train/config.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text(config.dump(cfg))  # as detpipe/train.py writes it; no datasets.yaml beside it
    model = init_detector(saved, device="cpu")
    assert model.meta["classes"] == list(cfg.data.classes) and model.meta["model"]["name"] == cfg.model.name
    result = inference_detector(model, make_image(tmp_path / "a.png", 64, 64))
    assert len(result) == len(cfg.data.classes)
    assert init_detector(cfg, device="cpu").meta["classes"] == list(cfg.data.classes)  # a loaded config
    assert init_detector(saved, ckpts["maskrcnn"]).meta["classes"] == CLASSES["maskrcnn"]  # the checkpoint's
    no_classes = tmp_path / "other.yaml"
    no_classes.write_text(saved.read_text().replace("classes:", "classes: []\n  was:"))
    with pytest.raises(DetpipeError, match=r"other.yaml: data.classes is empty .* pass the run's checkpoint"):
        init_detector(no_classes)


def test_async_calls_run_concurrently_and_match_sequential(ckpts, tmp_path):
    model = init_detector(None, ckpts["fcos"], device="cpu")
    images = [np.asarray(Image.open(make_image(tmp_path / f"{i}.png", 64, 64, seed=i))) for i in range(4)]
    sequential = [inference_detector(model, im) for im in images]

    async def concurrent():
        ticks = 0
        calls = asyncio.gather(*(async_inference_detector(model, im) for im in images))
        while not calls.done():  # the event loop keeps running while the model works in a thread
            ticks += 1
            await asyncio.sleep(0.001)
        return await calls, ticks

    results, ticks = asyncio.run(concurrent())
    assert ticks > 1
    for got, want in zip(results, sequential):
        assert all(np.array_equal(a, b) for a, b in zip(got, want))


# --- infer.run: image, folder, video, camera ------------------------------------------------------------------

def test_one_image_with_masks(ckpts, tmp_path):
    image = make_image(tmp_path / "in/photo.jpg", 72, 56)
    summary = infer.run(ckpts["maskrcnn"], image, tmp_path / "out", score_thr=0.2, device="cpu")
    assert summary["frames"] == 1 and summary["kind"] == "image"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["detections.json", "photo.jpg"]
    assert Image.open(tmp_path / "out/photo.jpg").size == (72, 56)
    data = json.loads((tmp_path / "out/detections.json").read_text())
    assert data["classes"] == CLASSES["maskrcnn"] and data["score_thr"] == 0.2
    [record] = data["results"]
    assert record["file"] == "photo.jpg" and (record["width"], record["height"]) == (72, 56)
    check_records(data["results"], CLASSES["maskrcnn"], 0.2)
    assert record["boxes"] and len(record["masks"]) == len(record["boxes"])
    decoded = mask_utils.decode({"size": record["masks"][0]["size"], "counts": record["masks"][0]["counts"].encode()})
    assert decoded.shape == (56, 72) and decoded.any()


def test_folder_of_images_keeps_names(ckpts, tmp_path, capsys):
    src = tmp_path / "in"
    make_image(src / "b.png", 64, 48)
    make_image(src / "a.jpg", 50, 70, seed=1)
    make_image(src / "c.jpeg", 64, 64, mode="L", seed=2)
    (src / "notes.txt").write_text("not an image")
    (src / "sub").mkdir()
    infer.run(ckpts["fcos"], src, tmp_path / "out", score_thr=0.3, device="cpu", batch_size=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jpg", "b.png", "c.jpeg", "detections.json"]
    assert Image.open(tmp_path / "out/a.jpg").size == (50, 70)
    data = json.loads((tmp_path / "out/detections.json").read_text())
    assert [r["file"] for r in data["results"]] == ["a.jpg", "b.png", "c.jpeg"]
    assert any(r["boxes"] for r in data["results"]) and "masks" not in data["results"][0]
    check_records(data["results"], CLASSES["fcos"], 0.3)
    printed = capsys.readouterr().out
    assert "3 images in" in printed and re.search(r"model alone: [0-9.]+ images/s, batch 2\)", printed)
    assert data["batch_size"] == 2 and data["device"] == "cpu" and data["model_seconds"] > 0
    assert data["model_fps"] == pytest.approx(3 / data["model_seconds"], rel=1e-2)
    infer.run(ckpts["fcos"], src / "b.png", tmp_path / "out", device="cpu")  # an earlier output is replaced
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.png", "detections.json"]


def test_video_gets_every_frame_at_its_rate_and_size(ckpts, tmp_path):
    video = write_video(tmp_path / "clip.mp4", frames=10, size=(64, 48), fps=12.0)
    summary = infer.run(ckpts["fcos"], video, tmp_path / "out", device="cpu", batch_size=4)
    assert summary["video"] == "clip.mp4" and summary["frames"] == 10
    assert 0 < summary["model_seconds"] <= summary["seconds"]  # the model's time is part of the whole run's
    assert summary["model_rate"] == pytest.approx(10 / summary["model_seconds"])
    assert video_info(tmp_path / "out/clip.mp4") == (10, 12.0, (64, 48))
    data = json.loads((tmp_path / "out/detections.json").read_text())
    assert [r["frame"] for r in data["results"]] == list(range(10)) and data["fps"] == 12.0
    check_records(data["results"], CLASSES["fcos"], 0.3)
    infer.run(ckpts["fcos"], video, tmp_path / "first4", device="cpu", batch_size=3, max_frames=4)
    assert video_info(tmp_path / "first4/clip.mp4")[0] == 4


class FakeCamera:
    """A camera played from a video file; sends the process SIGINT (Ctrl-C) after read number ``interrupt_at``."""

    def __init__(self, path, interrupt_at=None):
        self.capture, self.reads, self.interrupt_at = cv2.VideoCapture(str(path)), 0, interrupt_at

    def read(self):
        self.reads += 1
        frame = self.capture.read()
        if self.reads == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return frame

    def __getattr__(self, name):
        return getattr(self.capture, name)


@pytest.mark.parametrize("how", ["max-frames", "ctrl-c"])
def test_camera_records_until_max_frames_or_ctrl_c(ckpts, tmp_path, monkeypatch, how):
    video = write_video(tmp_path / "feed.avi", frames=10, fourcc="MJPG")
    real = cv2.VideoCapture
    monkeypatch.setattr(cv2, "VideoCapture", lambda src, *a: FakeCamera(video, 5 if how == "ctrl-c" else None)
                        if isinstance(src, int) else real(src, *a))
    handler = signal.getsignal(signal.SIGINT)
    limit = 6 if how == "max-frames" else None
    summary = infer.run(ckpts["fcos"], "0", tmp_path / "out", device="cpu", max_frames=limit)
    want = 6 if how == "max-frames" else 4  # Ctrl-C during the 5th read: the 4 frames before it are kept
    assert summary["kind"] == "camera" and summary["frames"] == want
    assert video_info(tmp_path / f"out/{summary['video']}")[0] == want and summary["video"].startswith("camera0.")
    assert len(json.loads((tmp_path / "out/detections.json").read_text())["results"]) == want
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C aborts again afterwards


def test_out_that_is_not_an_infer_output_is_refused(ckpts, tmp_path):
    image = make_image(tmp_path / "in/a.png", 32, 32)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/keep.txt").write_text("x")
    with pytest.raises(DetpipeError, match="mine: exists and is not an earlier infer output"):
        infer.run(ckpts["fcos"], image, tmp_path / "mine", device="cpu")
    with pytest.raises(DetpipeError, match="would replace the input"):
        infer.run(ckpts["fcos"], tmp_path / "in", tmp_path / "in", device="cpu")
    assert (tmp_path / "mine/keep.txt").exists() and (tmp_path / "in/a.png").exists()


# --- the stage script -----------------------------------------------------------------------------------------

def test_stage_script_on_a_folder_and_a_video(ckpts, tmp_path):
    make_image(tmp_path / "imgs/x.jpg", 64, 64)
    make_image(tmp_path / "imgs/y.png", 48, 64, seed=3)
    done = run_stage("infer", tmp_path, "--checkpoint", str(ckpts["fcos"]), "--input", "imgs", "--out", "out",
                     "--device", "cpu", "--batch-size", "2", "--score-thr", "0.5", env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    assert "2 images in" in done.stdout and "images/s" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["detections.json", "x.jpg", "y.png"]
    write_video(tmp_path / "v.mp4", frames=5)
    done = run_stage("infer", tmp_path, "--checkpoint", str(ckpts["fcos"]), "--input", "v.mp4", "--out", "vout",
                     "--device", "cpu", "--max-frames", "3", env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    assert "3 frames in" in done.stdout and "frames/s" in done.stdout
    assert video_info(tmp_path / "vout/v.mp4")[0] == 3


def bad_input(case: str, d, ckpt) -> tuple[list[str], str]:
    """Arguments for one kind of bad input, and the error line they must give."""
    image = str(make_image(d / "img.jpg", 32, 32))
    if case == "missing checkpoint":
        return ["--checkpoint", str(d / "nope.pt"), "--input", image], r"nope.pt: checkpoint is missing"
    if case == "truncated checkpoint":
        data = ckpt.read_bytes()
        (d / "cut.pt").write_bytes(data[: len(data) // 2])
        return ["--checkpoint", str(d / "cut.pt"), "--input", image], r"cut.pt: not a readable detpipe checkpoint"
    args = ["--checkpoint", str(ckpt), "--input"]
    if case == "missing input":
        return [*args, str(d / "nowhere.jpg")], r"nowhere.jpg: input does not exist"
    if case == "folder without images":
        (d / "empty").mkdir()
        (d / "empty/readme.txt").write_text("no pictures here")
        return [*args, str(d / "empty")], r"empty: the folder holds no images"
    if case == "unreadable video":
        (d / "broken.mp4").write_bytes(os.urandom(4096))
        return [*args, str(d / "broken.mp4")], r"broken.mp4: unreadable video"
    return [*args, "99"], r"camera 99: cannot open it"


@pytest.mark.parametrize("case", ["missing checkpoint", "truncated checkpoint", "missing input",
                                  "folder without images", "unreadable video", "camera that does not open"])
def test_bad_input_is_one_line_exit_2_and_no_output(case, ckpts, tmp_path):
    args, message = bad_input(case, tmp_path, ckpts["fcos"])
    done = run_stage("infer", tmp_path, *args, "--out", "results/out", "--device", "cpu", env=ONE_THREAD)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    assert re.search(message, lines[-1]), lines[-1]
    assert not (tmp_path / "results").exists()  # not even the parent folder it would have made
