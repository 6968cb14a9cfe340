import pytest
import torch

from detpipe import engine
from detpipe.apis import inference_detector, init_detector, show_result
from detpipe.config import Config
from detpipe.datasets import CocoDetection
from detpipe.models import build_model

TCFG = Config(epochs=1, batch_size=4, lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_iters=2,
              lr_schedule="cosine", hflip=0.5, amp=False, num_workers=0, log_interval=100)


def tiny_model(name="fcos"):
    torch.manual_seed(0)
    return build_model(name, "resnet18", 5, min_size=64, max_size=64, fpn_channels=64)


def train_once(tiny_coco, out, name="fcos"):
    masks = name == "maskrcnn"
    tr = CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw", masks)
    va = CocoDetection(tiny_coco / "coco/val.json", tiny_coco / "raw", masks)
    out.mkdir()
    model = tiny_model(name)
    history = engine.train(model, tr, va, TCFG, device=torch.device("cpu"), seed=0, out_dir=out, log=lambda m: None)
    return model, history


def test_training_is_seeded_and_logs(tiny_coco, tmp_path):
    _, first = train_once(tiny_coco, tmp_path / "a")
    _, second = train_once(tiny_coco, tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_img_per_s"} for r in rows]
    assert strip(first) == strip(second)
    row = first[0]
    assert {"epoch", "lr", "train_loss", "val_bbox_mAP", "val_bbox_mAP50"} <= set(row)
    lines = (tmp_path / "a/iter_log.csv").read_text().splitlines()
    assert lines[0] == "epoch,iter,lr,loss" and len(lines) == 1 + 2  # 8 images / batch 4
    ckpt = torch.load(tmp_path / "a/last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "scheduler", "rng"} <= set(ckpt)


def test_mask_model_trains_and_scores_segm(tiny_coco, tmp_path):
    _, history = train_once(tiny_coco, tmp_path / "m", name="maskrcnn")
    assert "val_segm_mAP" in history[0]


def test_lr_schedule():
    assert engine.lr_factor(0, 100, 10, "cosine") == pytest.approx(0.001)
    assert engine.lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert engine.lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert engine.lr_factor(70, 100, 10, "step") == pytest.approx(0.1)
    assert engine.lr_factor(50, 100, 10, "constant") == 1.0


def test_hflip_moves_boxes():
    image = torch.zeros(3, 10, 20)
    target = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 4.0]])}
    gen = torch.Generator().manual_seed(0)
    [flipped], [t] = engine._hflip([image], [target], gen, 1.0)
    assert t["boxes"].tolist() == [[15.0, 1.0, 18.0, 4.0]]


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


def test_fcos_rejects_too_narrow_pyramid():
    from detpipe.errors import DetpipeError

    with pytest.raises(DetpipeError, match="model.fpn_channels: fcos needs a multiple of 32 of at least 64"):
        build_model("fcos", "resnet18", 5, min_size=64, max_size=64, fpn_channels=32)


@pytest.mark.parametrize("name, backbone", [("fasterrcnn", "resnet18"), ("retinanet", "resnet18"),
                                            ("fasterrcnn", "mobilenet_v3_large"), ("ssdlite", "mobilenet_v3_large")])
def test_every_architecture_trains_one_step_and_predicts(name, backbone):
    torch.manual_seed(0)
    model = build_model(name, backbone, 3, min_size=64, max_size=64, fpn_channels=64)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    assert set(out[0]) >= {"boxes", "scores", "labels"}


def test_one_stage_models_refuse_mobilenet():
    from detpipe.errors import DetpipeError

    with pytest.raises(DetpipeError, match="retinanet needs a resnet backbone"):
        build_model("retinanet", "mobilenet_v3_large", 3, min_size=64, max_size=64)
