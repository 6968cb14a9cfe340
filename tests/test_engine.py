import io
import json
import math
import os
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from detpipe import datasets, engine
from detpipe.apis import inference_detector, init_detector, show_result
from detpipe.datasets import CocoDetection
from detpipe.errors import DetpipeError
from detpipe.files import write_json
from detpipe.models import build_model
from detpipe.transforms import RandomHorizontalFlip, train_transforms
from tests.conftest import ROOT, copy_repo, write_tiny_params
from tests.fixtures import make_image

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(name="fcos"):
    torch.manual_seed(0)
    return build_model(name, "resnet18", 5, min_size=64, max_size=64, fpn_channels=64)


def train_once(tiny_coco, out, name="fcos"):
    """One epoch the way the train stage composes the engine: loader, optimizer and schedule built apart."""
    masks = name == "maskrcnn"
    tr = CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw", masks, transforms=train_transforms(0.5, 1))
    va = CocoDetection(tiny_coco / "coco/val.json", tiny_coco / "raw", masks)
    out.mkdir()
    model = tiny_model(name)
    loader = engine.train_loader(tr, 4, 0, engine.seed_everything(0), CPU)
    optimizer = engine.build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = engine.build_scheduler(optimizer, len(loader), 2, "cosine")
    with open(out / "iter_log.csv", "w") as iter_log:
        iter_log.write("epoch,iter,lr,loss\n")
        row = engine.train_one_epoch(model, optimizer, scheduler, loader, CPU, 1, iter_log=iter_log,
                                     log=lambda m: None)
    _, evals = engine.evaluate(model, va, CPU, batch_size=4)
    row.update({f"val/{t}_mAP_50": r["stats"]["mAP_50"] for t, r in evals.items()})
    return model, [row]


def test_training_is_seeded_and_logs(tiny_coco, tmp_path):
    _, first = train_once(tiny_coco, tmp_path / "a")
    _, second = train_once(tiny_coco, tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("train_img_per_s", "train_seconds")} for r in rows]
    assert strip(first) == strip(second)
    row = first[0]
    assert {"epoch", "lr", "train_loss", "train_img_per_s", "val/bbox_mAP_50"} <= set(row)
    lines = (tmp_path / "a/iter_log.csv").read_text().splitlines()
    assert lines[0] == "epoch,iter,lr,loss" and len(lines) == 1 + 2  # 8 images / batch 4
    # warm-up over 2 iterations: after step 1 the factor is 0.001 + 0.999 / 2; after step 2 warm-up is done
    assert [line.split(",")[:3] for line in lines[1:]] == [["1", "1", "0.005005"], ["1", "2", "0.01"]]
    assert row["epoch"] == 1 and row["lr"] == pytest.approx(0.01)


def test_non_finite_loss_stops_before_the_step(tiny_coco, tmp_path):
    tr = CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw")
    model = tiny_model()
    loader = engine.train_loader(tr, 4, 0, engine.seed_everything(0), CPU)
    optimizer = engine.build_optimizer(model, lr=1e30, momentum=0.9, weight_decay=0.0)
    scheduler = engine.build_scheduler(optimizer, 10 * len(loader), 0, "constant")
    with pytest.raises(engine.NonFiniteLoss, match=r"loss is (nan|inf|-inf) at iteration \d+ \(epoch \d+\)"):
        for epoch in range(1, 11):
            engine.train_one_epoch(model, optimizer, scheduler, loader, CPU, epoch, log=lambda m: None)


def one_epoch(tiny_coco, *, batch_size=2, dataset=None, loader_args=None, optimizer_args=None, lr=0.01,
              epochs=1, **loop_args) -> tuple[str, list[dict]]:
    """``iter_log.csv``'s text and the epoch rows (without the timing) of a seeded FCOS run on the tiny set."""
    tr = dataset or CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw", transforms=train_transforms(0.5, 1))
    model = tiny_model()
    loader = engine.train_loader(tr, batch_size, 0, engine.seed_everything(0), CPU, **(loader_args or {}))
    optimizer = engine.build_optimizer(model, lr=lr, momentum=0.9, weight_decay=1e-4, **(optimizer_args or {}))
    scheduler = engine.build_scheduler(optimizer, epochs * len(loader), 2, "cosine")
    iter_log, rows = io.StringIO(), []
    for epoch in range(1, epochs + 1):
        row = engine.train_one_epoch(model, optimizer, scheduler, loader, CPU, epoch, iter_log=iter_log,
                                     first_iter=(epoch - 1) * len(loader), total_iters=epochs * len(loader),
                                     log=lambda m: None, **loop_args)
        rows.append({k: v for k, v in row.items() if k not in ("train_img_per_s", "train_seconds")})
    return iter_log.getvalue(), rows


def test_deferred_sync_writes_the_same_bytes_as_reading_every_iteration(tiny_coco):
    """The losses read at log points only (no host sync per iteration) give the same iter_log and metrics."""
    every = one_epoch(tiny_coco, deferred_sync=False, log_interval=1)
    assert len(every[0].splitlines()) == 4 and every[1][0]["train_loss"] > 0  # 8 images / batch 2
    for log_interval in (1, 3):  # 3: a log point, then the epoch's end, flush the rows in between
        assert one_epoch(tiny_coco, deferred_sync=True, log_interval=log_interval) == every


def test_deferred_sync_stops_at_the_first_non_finite_loss_with_the_same_error(tiny_coco):
    caught = {}
    for deferred in (False, True):
        with pytest.raises(engine.NonFiniteLoss) as exc:
            one_epoch(tiny_coco, lr=1e30, epochs=6, deferred_sync=deferred, log_interval=50)
        caught[deferred] = (str(exc.value), exc.value.iteration, exc.value.epoch)
    assert caught[True] == caught[False]
    assert re.fullmatch(r"loss is (nan|inf|-inf) at iteration \d+ \(epoch \d+\)", caught[True][0])


def test_deferred_sync_keeps_the_rows_before_the_bad_iteration(tiny_coco):
    """Rows buffered on the device are written up to the iteration that had the non-finite loss."""
    logs = {}
    for deferred in (False, True):
        tr = CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw")
        model = tiny_model()
        loader = engine.train_loader(tr, 2, 0, engine.seed_everything(0), CPU)
        optimizer = engine.build_optimizer(model, lr=0.01)
        scheduler = engine.build_scheduler(optimizer, len(loader), 0, "constant")
        calls, real = iter(range(100)), model.forward

        def poisoned(images, targets, real=real, calls=calls):  # the third iteration's loss is NaN
            losses = real(images, targets)
            if next(calls) == 2:
                losses["classification"] = losses["classification"] * float("nan")
            return losses

        model.forward = poisoned
        iter_log = io.StringIO()
        with pytest.raises(engine.NonFiniteLoss, match=r"loss is nan at iteration 3 \(epoch 1\)"):
            engine.train_one_epoch(model, optimizer, scheduler, loader, CPU, 1, iter_log=iter_log,
                                   log_interval=10, deferred_sync=deferred, log=lambda m: None)
        logs[deferred] = iter_log.getvalue()
    assert logs[True] == logs[False] and [r.split(",")[1] for r in logs[True].splitlines()] == ["1", "2"]


def test_speed_levers_are_applied_and_off_leaves_the_model_as_it_was(tiny_coco, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append((fn, k["dynamic"])) or fn)  # ~1 min
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = tiny_model()
    keys = list(model.state_dict())
    assert engine.speed_up(model) is model and not compiled and torch.backends.cudnn.benchmark is False
    assert all(p.is_contiguous() for p in model.parameters())
    engine.speed_up(model, channels_last=True, compile=True, cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is True
    conv = model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert compiled == [(model.backbone._call_impl, None)] and list(model.state_dict()) == keys  # same keys
    other = tiny_model()
    engine.speed_up(other, compile=True, static_shapes=True)  # model.fixed_canvas: one graph per canvas, not dynamic
    assert compiled[1:] == [(other.backbone._call_impl, False)]
    loader = engine.train_loader(CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw"), 4, 0,
                                 engine.seed_everything(0), CPU)
    optimizer = engine.build_optimizer(model, lr=0.01)
    row = engine.train_one_epoch(model, optimizer, engine.build_scheduler(optimizer, len(loader), 0, "constant"),
                                 loader, CPU, 1, log=lambda m: None)
    assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0  # the NHWC model trains


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_where_torch_has_it_else_foreach(name, monkeypatch):
    model = tiny_model()
    plain = engine.build_optimizer(model, name, lr=0.01)
    assert plain.defaults["fused"] is None and plain.defaults["foreach"] is None  # torch's choice, as before
    fused = engine.build_optimizer(model, name, lr=0.01, fused=True)
    assert fused.defaults["fused"] is True  # torch has fused SGD and AdamW on the CPU
    monkeypatch.setattr(engine, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    fallback = engine.build_optimizer(model, name, lr=0.01, fused=True)
    assert not fallback.defaults["fused"] and fallback.defaults["foreach"] is True


def test_fused_optimizer_trains_like_the_plain_one(tiny_coco):
    plain = one_epoch(tiny_coco, batch_size=4)
    fused = one_epoch(tiny_coco, batch_size=4, optimizer_args={"fused": True})
    assert fused[1][0]["train_loss"] == pytest.approx(plain[1][0]["train_loss"], rel=1e-3)


def test_loader_levers():
    data = list(range(8))
    cuda, cpu = torch.device("cuda"), CPU
    loader = lambda device, workers, **kw: engine.train_loader(data, 2, workers, torch.Generator(), device, **kw)
    assert loader(cuda, 0).pin_memory and not loader(cuda, 0, pin_memory=False).pin_memory
    assert not loader(cpu, 0).pin_memory  # nothing to pin for on the CPU
    default = loader(cpu, 2)
    assert default.prefetch_factor == 2 and not default.persistent_workers  # torch's defaults, as before
    tuned = loader(cpu, 2, prefetch_factor=6, persistent_workers=True)
    assert tuned.prefetch_factor == 6 and tuned.persistent_workers
    assert loader(cpu, 0, prefetch_factor=6, persistent_workers=True).prefetch_factor is None  # no workers


def test_encoded_jpegs_decode_in_the_loop_as_the_dataset_decodes_them(tiny_coco, tmp_path):
    """train.gpu_decode's path, on the CPU: JPEG bytes from the dataset, decoded and augmented in the loop."""
    coco = tiny_coco / "coco/train.json"
    plain = CocoDetection(coco, tiny_coco / "raw", transforms=train_transforms(1.0, 1))
    encoded = CocoDetection(coco, tiny_coco / "raw", transforms=train_transforms(1.0, 1), encoded=True)
    raw, target = encoded[0]
    assert raw.dim() == 1 and raw.dtype == torch.uint8 and raw[:2].tolist() == [0xFF, 0xD8]  # a JPEG's bytes
    assert torch.equal(target["boxes"], CocoDetection(coco, tiny_coco / "raw")[0][1]["boxes"])  # not flipped yet
    decoded = plain[1][0]
    images, targets = datasets.decode_on_device([raw, decoded], [target, {}], CPU, encoded.transforms)
    image, flipped = plain[0]
    assert images[0].shape == image.shape and (images[0].int() - image.int()).abs().max() <= 2
    assert torch.equal(targets[0]["boxes"], flipped["boxes"])  # flipped in the loop, as the dataset flips
    assert images[1] is decoded and targets[1] == {}  # what the dataset decoded passes unchanged
    for kind in ("png", "rotated"):  # what nvJPEG cannot decode as read_rgb does stays decoded by the dataset
        name = make_image(tmp_path / kind / "a.jpg" if kind == "rotated" else tmp_path / kind / "a.png", 40, 30,
                          orientation=6 if kind == "rotated" else None).name
        write_json(tmp_path / kind / "c.json", {"images": [{"id": 1, "file_name": name, "width": 40, "height": 30}],
                                                "annotations": [], "categories": [{"id": 1, "name": "x"}]})
        image, _ = CocoDetection(tmp_path / kind / "c.json", tmp_path / kind, encoded=True)[0]
        assert image.shape == (3, 30, 40)
    log, rows = one_epoch(tiny_coco, batch_size=4, dataset=encoded)
    assert len(log.splitlines()) == 2 and rows[0]["train_loss"] > 0


def test_gpu_decode_without_cuda_is_a_one_line_error(tiny_coco, tmp_path, monkeypatch):
    from detpipe import config, train

    monkeypatch.chdir(tmp_path)
    cfg = config.load(write_tiny_params(tmp_path), ["train.gpu_decode=true"])
    with pytest.raises(DetpipeError, match=r"^train.gpu_decode: decodes JPEGs on a CUDA GPU, but the device is cpu"):
        train.run(cfg, tiny_coco / "coco", tiny_coco / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_train_stage_passes_the_levers_on(tiny_coco, tmp_path, monkeypatch):
    from detpipe import config, train
    from detpipe.models import load_checkpoint
    from tests.conftest import write_tiny_params

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: fn)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen = {}

    def spy(name, real):
        def call(*args, **kwargs):
            seen[name] = kwargs
            return real(*args, **kwargs)
        return call

    for name in ("train_loader", "speed_up", "build_optimizer", "train_one_epoch"):
        monkeypatch.setattr(engine, name, spy(name, getattr(engine, name)))
    rpn_calls = []
    monkeypatch.setattr(train, "parallel_rpn", lambda model: rpn_calls.append(model) or False)
    sync_free, real_sync_free = [], train.sync_free_inputs
    monkeypatch.setattr(train, "sync_free_inputs", lambda model: sync_free.append(real_sync_free(model)))
    loss_heads, real_loss = [], train.sync_free_loss
    monkeypatch.setattr(train, "sync_free_loss",
                        lambda model: real_loss(model) and loss_heads.append(type(model.head).__name__))
    levers = {"deferred_sync": False, "channels_last": True, "compile": True, "cudnn_benchmark": True,
              "fused_optimizer": True, "pin_memory": False, "prefetch_factor": 3, "persistent_workers": True,
              "parallel_rpn": True, "sync_free_inputs": True, "sync_free_loss": True}
    cfg = config.load(write_tiny_params(tmp_path), [f"train.{k}={str(v).lower()}" for k, v in levers.items()]
                      + ["model.fixed_canvas=true"])
    train.run(cfg, tiny_coco / "coco", tiny_coco / "raw", tmp_path / "out")
    assert type(load_checkpoint(tmp_path / "out/model.pt")[0].transform).__name__ == "CanvasTransform"
    assert seen["train_loader"].items() >= {"pin_memory": False, "prefetch_factor": 3,
                                            "persistent_workers": True}.items()
    assert seen["speed_up"] == {"channels_last": True, "compile": True, "cudnn_benchmark": True,
                                "static_shapes": True}  # model.fixed_canvas: one compiled graph per canvas
    assert len(rpn_calls) == 1  # train.parallel_rpn (the tiny FCOS has no RPN: nothing to change)
    assert sync_free == [True]  # train.sync_free_inputs, applied to the FCOS it then trained
    assert loss_heads == ["SyncFreeFCOSHead"]  # train.sync_free_loss, likewise
    assert seen["build_optimizer"]["fused"] is True and seen["train_one_epoch"]["deferred_sync"] is False
    assert torch.backends.cudnn.benchmark is True and (tmp_path / "out/model.pt").is_file()


def test_mask_model_trains_and_scores_segm(tiny_coco, tmp_path):
    _, history = train_once(tiny_coco, tmp_path / "m", name="maskrcnn")
    assert "val/segm_mAP_50" in history[0]


def test_lr_schedule():
    assert engine.lr_factor(0, 100, 10, "cosine") == pytest.approx(0.001)
    assert engine.lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert engine.lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert engine.lr_factor(70, 100, 10, "step") == pytest.approx(0.1)
    assert engine.lr_factor(50, 100, 10, "constant") == 1.0


def test_hflip_moves_boxes_and_masks():
    image = torch.zeros(3, 10, 20, dtype=torch.uint8)
    image[:, 1, 2] = 255
    mask = torch.zeros(1, 10, 20, dtype=torch.uint8)
    mask[0, 1, 2] = 1
    target = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 4.0]]), "masks": mask}
    flipped, t = RandomHorizontalFlip(1.0, seed=0)(image, target)
    assert t["boxes"].tolist() == [[15.0, 1.0, 18.0, 4.0]]
    assert flipped[0, 1, 17] == 255 and t["masks"][0, 1, 17] == 1
    assert target["boxes"].tolist() == [[2.0, 1.0, 5.0, 4.0]]  # the dataset's own target is not changed


def test_hflip_is_seeded_and_draws_nothing_at_zero():
    image, target = torch.zeros(3, 4, 6, dtype=torch.uint8), {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]])}
    flips = lambda t: [t(image, target)[1]["boxes"][0, 0].item() != 0.0 for _ in range(32)]
    assert flips(RandomHorizontalFlip(0.5, seed=3)) == flips(RandomHorizontalFlip(0.5, seed=3))
    assert 0 < sum(flips(RandomHorizontalFlip(0.5, seed=3))) < 32
    off = RandomHorizontalFlip(0.0, seed=3)
    before = off.generator.get_state()
    assert not any(flips(off)) and torch.equal(off.generator.get_state(), before)


def test_tutorial_apis(tiny_coco, tmp_path):
    model, _ = train_once(tiny_coco, tmp_path / "t")
    meta = {"model": {"name": "fcos", "backbone": "resnet18", "min_size": 64, "max_size": 64, "fpn_channels": 64},
            "classes": ["circle", "square", "triangle", "cross"], "cat_ids": [1, 2, 3, 4]}
    torch.save({"model": model.state_dict(), "meta": meta}, tmp_path / "model.pt")
    detector = init_detector(None, tmp_path / "model.pt", device="cpu")
    image = tiny_coco / "raw/val/val_00000.jpg"
    result = inference_detector(detector, image)
    assert len(result) == 4 and all(r.shape[1] == 5 for r in result)
    assert result.class_names == meta["classes"]
    both = inference_detector(detector, [image, image])
    assert len(both) == 2 and all(len(r) == 4 for r in both)
    top = lambda res: max((d for dets in res for d in dets), key=lambda d: d[4])
    assert top(both[0]) == pytest.approx(top(result), abs=1e-3)  # batching must not change the answer
    picture = show_result(image, result, score_thr=0.0, out_file=tmp_path / "shown.png")
    assert (tmp_path / "shown.png").stat().st_size > 0 and picture.size == (64, 64)


def test_notebook_training_from_python(tiny_coco, tmp_path, monkeypatch):
    """The tutorial's build_dataset / build_detector / train_detector, then inference on the result."""
    from detpipe.apis import build_dataset, build_detector, load_config, train_detector
    from tests.conftest import write_tiny_params

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(write_tiny_params(tmp_path), ["train.epochs=1"])
    train_set = build_dataset(cfg, "train", tiny_coco / "coco", tiny_coco / "raw")
    image, target = train_set[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and target["boxes"].shape[1] == 4
    model = build_detector(cfg, len(train_set.class_names))
    assert model.head.classification_head.num_classes == 4 + 1
    history = train_detector(cfg, tiny_coco / "coco", tiny_coco / "raw", tmp_path / "out")
    assert [row["epoch"] for row in history] == [1]
    detector = init_detector(tmp_path / "out/config.yaml", tmp_path / "out/model.pt")
    assert len(inference_detector(detector, tiny_coco / "raw/val/val_00000.jpg")) == 4


def test_decoding_on_cuda_drains_the_callers_stream_first(tiny_coco, monkeypatch):
    """nvJPEG writes on torchvision's own stream into memory our queued kernels may still read (pytorch/vision#9606;
    NaN losses by iteration 2 to 4 on an H100, docs/performance.md): the stream is drained before every CUDA decode."""
    import torchvision.io

    calls = []

    class Stream:
        def synchronize(self):
            calls.append("synchronize")

    def decode(data, mode, device):
        calls.append(f"decode {len(data)} on {device}")
        return [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode)
    raw, target = CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw", encoded=True)[0]
    datasets.decode_on_device([raw, raw], [target, target], torch.device("cuda"))
    assert calls == ["synchronize", "decode 2 on cuda"]
    calls.clear()
    datasets.decode_on_device([raw], [target], CPU)
    assert calls == ["decode 1 on cpu"]  # nothing to drain on the CPU


@pytest.mark.slow
def test_bench_default_stops_at_until_and_reports_each_seed_as_it_ends(tmp_path):
    """benchmarks/bench_default.py on tiny params: the stages up to --until, then one more seed, then the seed
    --avx2 names on AVX2 kernels, all with the --set override; a JSON line per run as it ends (what a run cut
    short keeps), and the spread, mean and standard deviation over the runs in the JSON file."""
    project = copy_repo(tmp_path / "p")
    write_tiny_params(project)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_default", "--seeds", "0", "1", "--until",
                           "evaluate", "--avx2", "1", "--set", "train.epochs=2", "--json", str(tmp_path / "b.json")],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert [s["stage"] for s in result["stages"]] == ["download", "convert", "train", "evaluate"]
    assert [(r["seed"], r["kernels"]) for r in result["runs"]] == [(0, "native"), (1, "native"), (1, "avx2")]
    assert result["overrides"] == ["train.epochs=2"]
    assert all(len(r["val_mAP_50_per_epoch"]) == 2 for r in result["runs"])  # tiny params: 1 epoch, validated each
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines == result["runs"]
    values = [r["bbox_mAP_50"] for r in result["runs"]]
    assert result["spread_mAP_50"] == round(max(values) - min(values), 4)
    assert result["mean_mAP_50"] == round(statistics.mean(values), 4)
    assert result["stdev_mAP_50"] == round(statistics.stdev(values), 4)
    assert f"spread (max - min) {result['spread_mAP_50']:.3f}" in done.stdout
    for run in result["runs"]:  # which class moves the mean: AP@0.5 of each of the dataset's classes
        assert list(run["AP_50_per_class"]) == ["circle", "square", "triangle", "cross"]
        assert all(v is None or 0 <= v <= 1 for v in run["AP_50_per_class"].values())


def test_bench_default_refuses_to_time_snakemake_with_overrides(tmp_path):
    """Snakemake runs the params file as it is: timing it beside runs with --set would mix two params."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_default", "--set", "train.epochs=2",
                           "--snakemake"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and not list(tmp_path.iterdir())
    assert done.stderr.strip().splitlines()[-1].endswith(
        "--snakemake times the params file as it is, without --set: run them separately")


@pytest.mark.slow
def test_the_gpu_session_script_runs_the_steps_asked_for_and_skips_what_no_longer_fits(tmp_path):
    """benchmarks/gpu_session.sh at toy sizes on the CPU: the chosen steps run, each under its limit, with their
    output in session.log and a JSON each; a step that does not fit in what is left is skipped and says so."""
    env = {**os.environ, "OUT": str(tmp_path / "a"), "GPU_SESSION_SMOKE": "1", "PYTHON": sys.executable,
           "GPU_SESSION_STEPS": "train_bench infer", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "a/session.log").read_text()
    assert "== train_bench: exit 0" in log and "== infer: exit 0" in log and "failed=0, skipped=0" in log
    assert "== default" not in log and "== stages" not in log  # not asked for
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["bench_infer_gpu.json", "gpu_train_bench.json",
                                                                  "profile.txt", "session.log"]
    env.update(OUT=str(tmp_path / "b"), GPU_SESSION_SECONDS="1")
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 3 and "== train_bench: skipped" in done.stdout and "== infer: skipped" in done.stdout


def test_gpu_train_bench_smoke_runs_every_loop_and_the_profile_without_pycocotools_or_mlflow(tmp_path):
    """The GPU benchmark's code, on the CPU at tiny sizes, where importing pycocotools or MLflow fails (the lent
    GPU machines have neither): the three loops, each with its ratio to the plain one, then the profiler table."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("pycocotools", "mlflow", "ultrafast_pycocotools"):
        (blocked / f"{name}.py").write_text("raise ImportError('not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                       timeout=600)
    done = run("-m", "benchmarks.gpu_train_bench", "--smoke", "--json", str(tmp_path / "bench.json"),
               "--profile", str(tmp_path / "profile.txt"))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["model"], r["loop"], r["amp"]) for r in results] == [
        ("fcos_resnet50_fpn", loop, "fp32") for loop in ("plain", "ours", "ours-worker-decode")]
    assert all(r["img_per_s"] > 0 and r["images_timed"] == 4 for r in results)
    assert "ratio_to_plain" not in results[0] and all(r["ratio_to_plain"] > 0 for r in results[1:])
    assert "/plain" in done.stdout and "ours-worker-decode" in done.stdout
    profile = (tmp_path / "profile.txt").read_text()
    assert profile.startswith("fcos_resnet50_fpn ours fp32: ") and "Self CPU time total" in profile
    phases = {line.split()[0] for line in profile.splitlines()[2:8] if line.endswith(" 2")}  # the 2 timed iterations
    assert phases == {"backbone", "compute_loss", "head", "transform"}, profile[:800]
    done = run("-m", "benchmarks.gpu_train_bench", "--smoke", "--photo-sizes", "--loops", "plain", "ours-grouped",
               "ours-canvas", "--json", str(tmp_path / "canvas.json"))  # images of many sizes; grouped; canvas
    assert done.returncode == 0, done.stderr
    bench = json.loads((tmp_path / "canvas.json").read_text())
    assert bench["setup"]["image_size"] == "photo-like mix"
    assert [r["loop"] for r in bench["results"]] == ["plain", "ours-grouped", "ours-canvas"]
    assert all(r["img_per_s"] > 0 for r in bench["results"])
    done = run("-m", "benchmarks.gpu_train_bench", "--smoke", "--models", "maskrcnn_resnet50_fpn", "--amp", "off",
               "--loops", "plain", "ours-worker-decode", "ours-full-masks", "--json", str(tmp_path / "masks.json"))
    assert done.returncode == 0, done.stderr  # Mask R-CNN on cropped masks (ours) and image-sized ones
    assert [r["loop"] for r in json.loads((tmp_path / "masks.json").read_text())["results"]] == [
        "plain", "ours-worker-decode", "ours-full-masks"]
    masks = ("from pathlib import Path; from benchmarks import gpu_train_bench as b; "
             f"coco = b.make_images(Path({str(tmp_path / 'imgs')!r}), 2, 3, 40, 60); "
             "image, target = b.CocoDetection(coco, coco.parent, with_masks=True, mask_targets='full')[2]; "
             "plain = b.PlainDataset(coco, True)[2][1]['masks']; "
             "assert target['masks'].shape == plain.shape == (len(target['boxes']), 40, 60), target; "
             "assert (target['masks'] != plain).float().mean() < 0.1")  # rounding may move an edge by a pixel
    done = run("-c", masks)  # Mask R-CNN's box masks, in both loops
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_gpu_train_bench_checks_and_times_the_parallel_rpn(tmp_path):
    """--check-rpn (here on the CPU's threaded path) finds train.parallel_rpn's proposals equal to torchvision's,
    and the ours-parallel-rpn loop trains Faster R-CNN."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_train_bench", "--smoke", "--check-rpn", "--models",
                           "fasterrcnn_resnet50_fpn", "--loops", "plain", "ours-parallel-rpn", "--cudnn-benchmark",
                           "off", "--json", str(tmp_path / "rpn.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    bench = json.loads((tmp_path / "rpn.json").read_text())
    check, *runs = bench["results"]
    assert check["check"] == "parallel_rpn" and check["fp32_equal"] is True and check["bf16_equal"] is True
    assert check["fp32_kept"] == [2000, 2000] and check["fp32_parallel_ms"] > 0 and check["repeats"] == 10
    assert [(r["loop"], r["rpn"]) for r in runs] == [("plain", "RegionProposalNetwork"),
                                                     ("ours-parallel-rpn", "ParallelRPN")]
    assert runs[1]["ratio_to_plain"] > 0 and bench["setup"]["cudnn_benchmark"] == "off"


def test_the_sync_census_counts_each_warning_by_its_line(monkeypatch):
    """gpu_train_bench's SyncCensus (its CUDA sync debug mode stubbed): every sync warning counted, by the line
    that led to it, other warnings passed on, the warning filters restored."""
    import warnings

    from benchmarks.gpu_train_bench import SyncCensus

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    filters = warnings.filters[:]

    def sync():
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)

    with pytest.warns(UserWarning, match="something else"), SyncCensus() as census:
        for _ in range(3):
            sync()
        warnings.warn("something else", stacklevel=1)
    assert modes == ["warn", 0] and warnings.filters == filters
    [(site, count)] = census.sites.items()
    assert count == 3 and site.endswith(" sync") and "test_engine.py:" in site


def test_profile_train_profiles_the_default_in_both_layouts(tmp_path):
    """benchmarks/profile_train at toy length: the default's iteration in NCHW and NHWC, with the operators the
    docs quote (max-pooling, the convolutions) in both tables."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.profile_train", "--images", "32", "--warmup", "1",
                           "--iters", "2", "--json", str(tmp_path / "p.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "p.json").read_text())["results"]
    assert [r["channels_last"] for r in rows] == [False, True]
    for row in rows:
        assert row["ms_per_iter"] > 0
        assert {"aten::max_pool2d_with_indices", "aten::mkldnn_convolution",
                "aten::convolution_backward"} <= set(row["self_cpu_ms"])


def reference_results(outputs, image_ids, cat_ids, score_thr) -> list[dict]:
    """engine.predict as it was written first: one detection at a time, Python's round, one RLE per mask; with the
    background label dropped, as predict now does."""
    from pycocotools import mask as mask_utils

    from benchmarks.bench_eval import results_one_by_one

    kept = [(out, (out["scores"] >= score_thr) & (out["labels"] >= 1)) for out in outputs]
    results = results_one_by_one([(image_id, out["boxes"][keep].float().numpy(), out["scores"][keep].float().numpy(),
                                   out["labels"][keep].numpy()) for image_id, (out, keep) in zip(image_ids, kept)],
                                 cat_ids)
    masks = [mask for out, keep in kept if "masks" in out for mask in (out["masks"][keep, 0] > 0.5).numpy()]
    for det, mask in zip(results, masks):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    return results


class Recording(torch.nn.Module):
    """The model, its outputs kept."""

    def __init__(self, model):
        super().__init__()
        self.model, self.outputs = model, []

    def forward(self, images):
        outputs = self.model(images)
        self.outputs += outputs
        return outputs


@pytest.mark.parametrize("name, score_thr", [("fcos", 0.0), ("maskrcnn", 0.0), ("maskrcnn", "some")])
def test_predict_gives_the_per_detection_results_exactly(tiny_coco, tmp_path, name, score_thr):
    """The vectorised conversion (metrics.Detections, masks encoded per image, written batch by batch) against the
    loop it replaced, on the same outputs of the model: the same JSON bytes, the same values in the columns."""
    import orjson

    from detpipe.metrics import Detections

    dataset = CocoDetection(tiny_coco / "coco/val.json", tiny_coco / "raw", name == "maskrcnn")
    image_ids = [int(dataset[i][1]["image_id"]) for i in range(len(dataset))]
    model = Recording(tiny_model(name))
    if score_thr == "some":  # a threshold that leaves some images none, some one, some many detections
        engine.predict(model, dataset, CPU, batch_size=2)
        best = sorted(float(out["scores"].max()) for out in model.outputs)
        score_thr, model.outputs = (best[0] + best[1]) / 2, []
    got = engine.predict(model, dataset, CPU, batch_size=2, score_thr=score_thr, predictions_file=tmp_path / "p.json")
    want = reference_results(model.outputs, image_ids, dataset.cat_ids, score_thr)
    assert len(model.outputs) == len(dataset) and len(got) >= 3 and len(got) == len(want)
    assert len({d["image_id"] for d in want}) < len(dataset) or score_thr == 0.0
    assert (tmp_path / "p.json").read_bytes() == orjson.dumps(want) + b"\n"  # the file the old code wrote
    assert got.results() == [{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in want]
    columns = Detections.from_results(want)
    assert all(np.array_equal(getattr(got, k), getattr(columns, k)) for k in ("image_id", "category_id", "bbox",
                                                                                "score"))
    assert name != "maskrcnn" or all("segmentation" in d for d in want)
    model.outputs = []  # without a file: the same columns, the masks not encoded
    again = engine.predict(model, dataset, CPU, batch_size=2, score_thr=score_thr)
    assert np.array_equal(again.bbox, got.bbox) and np.array_equal(again.score, got.score)


def test_results_file_is_the_whole_list_written_at_once(tmp_path):
    """Batches of every size, empty ones first, between and last: the bytes of one orjson.dumps of all of them."""
    import orjson

    from detpipe.metrics import ResultsFile, write_json_bytes

    batches = [[], [{"image_id": 1, "score": 0.5}], [], [{"image_id": 2, "bbox": [1.0, 2.5]}] * 3, []]
    with ResultsFile(tmp_path / "a.json") as f:
        for batch in batches:
            f.add(batch)
    write_json_bytes(tmp_path / "b.json", [d for batch in batches for d in batch])
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert orjson.loads((tmp_path / "a.json").read_bytes())[1:] == [{"image_id": 2, "bbox": [1.0, 2.5]}] * 3
    with ResultsFile(tmp_path / "empty.json"):
        pass
    assert (tmp_path / "empty.json").read_bytes() == b"[]\n"
    with pytest.raises(RuntimeError), ResultsFile(tmp_path / "broken.json") as f:
        f.add(batches[1])
        raise RuntimeError("the model failed")
    assert not (tmp_path / "broken.json").exists()  # no half-written list


class Broken(torch.nn.Module):
    """A model whose weights went bad: NaN boxes (scores fine) or NaN scores (dropped by any threshold)."""

    def __init__(self, what):
        super().__init__()
        self.what = what

    def forward(self, images):
        nan = torch.tensor(float("nan"))
        return [{"boxes": torch.tensor([[1.0, 2.0, 9.0, 9.0]]) * (nan if self.what == "boxes" else 1),
                 "scores": torch.tensor([0.5]) * (nan if self.what == "scores" else 1),
                 "labels": torch.tensor([1])} for _ in images]


@pytest.mark.parametrize("what", ["boxes", "scores"])
def test_predict_refuses_outputs_that_are_not_finite(tiny_coco, tmp_path, what):
    dataset = CocoDetection(tiny_coco / "coco/val.json", tiny_coco / "raw")
    with pytest.raises(DetpipeError, match=r"^\S+\.(png|jpg): the model's boxes or scores are NaN or infinite; "):
        engine.predict(Broken(what), dataset, CPU, batch_size=2, predictions_file=tmp_path / "p.json")


def test_predict_refuses_an_image_of_another_size_than_its_coco_file_says(tiny_coco, tmp_path):
    """Boxes would be scored in the wrong pixels, and ultrafast-pycocotools hangs on masks of another size."""
    coco = json.loads((tiny_coco / "coco/val.json").read_text())
    image = coco["images"][1]
    width, image["width"] = image["width"], image["width"] + 8
    (tmp_path / "val.json").write_text(json.dumps(coco))
    dataset = CocoDetection(tmp_path / "val.json", tiny_coco / "raw", with_masks=True)
    with pytest.raises(DetpipeError) as error:
        engine.predict(tiny_model("maskrcnn"), dataset, CPU, batch_size=2, predictions_file=tmp_path / "p.json")
    assert str(error.value) == (f"{tmp_path / 'val.json'}: {image['file_name']} is {width}x{image['height']} pixels, "
                                f"the file says {width + 8}x{image['height']}; run the convert stage again")


class Fixed(torch.nn.Module):
    """Two detections on every image: one of the background label 0 (RetinaNet's and FCOS's heads give it)."""

    def forward(self, images):
        return [{"boxes": torch.tensor([[1.0, 2.0, 9.0, 9.0], [3.0, 3.0, 7.0, 8.0]]),
                 "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 2])} for _ in images]


def test_predict_drops_the_background_label_and_scores_columns_like_dicts(tiny_coco, tmp_path):
    from detpipe.metrics import coco_evaluate

    dataset = CocoDetection(tiny_coco / "coco/val.json", tiny_coco / "raw")
    dets = engine.predict(Fixed(), dataset, CPU, batch_size=2, predictions_file=tmp_path / "p.json")
    assert len(dets) == len(dataset) and set(dets.category_id.tolist()) == {dataset.cat_ids[1]}
    assert json.loads((tmp_path / "p.json").read_text()) == dets.results()
    # columns without the files: made result dicts for the library, the same numbers as the dicts themselves
    assert coco_evaluate(dataset.coco, dets) == coco_evaluate(dataset.coco, dets.results())
