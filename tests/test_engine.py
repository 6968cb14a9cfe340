import pytest
import torch

from detpipe import engine
from detpipe.apis import inference_detector, init_detector, show_result
from detpipe.datasets import CocoDetection
from detpipe.models import build_model
from detpipe.transforms import RandomHorizontalFlip, train_transforms

CPU = torch.device("cpu")


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
    row.update({f"val_{t}_mAP50": r["stats"]["mAP50"] for t, r in evals.items()})
    return model, [row]


def test_training_is_seeded_and_logs(tiny_coco, tmp_path):
    _, first = train_once(tiny_coco, tmp_path / "a")
    _, second = train_once(tiny_coco, tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_img_per_s"} for r in rows]
    assert strip(first) == strip(second)
    row = first[0]
    assert {"epoch", "lr", "train_loss", "train_img_per_s", "val_bbox_mAP50"} <= set(row)
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


def test_mask_model_trains_and_scores_segm(tiny_coco, tmp_path):
    _, history = train_once(tiny_coco, tmp_path / "m", name="maskrcnn")
    assert "val_segm_mAP50" in history[0]


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
