"""train.mask_targets: cropped: each object's mask cut to the object instead of an image-sized bitmap."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection import roi_heads
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes
from torchvision.ops import roi_align

from benchmarks.bench_mask_round_trip import centroids
from detpipe.datasets import CocoDetection, cropped_masks
from detpipe.errors import DetpipeError
from detpipe.images import ann_crop, ann_mask
from detpipe.models import _crop_aware_heads_class, build_model
from detpipe.transforms import RandomHorizontalFlip, RandomScale
from tests.conftest import ROOT, without_detpipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_polygons(rng, height, width, decimals=None):
    polys = []
    for _ in range(int(rng.integers(1, 3))):
        n = int(rng.integers(3, 9))
        cx, cy, r = rng.uniform(-20, width + 20), rng.uniform(-20, height + 20), rng.uniform(0.3, 40)
        pts = np.stack([cx + r * rng.uniform(-1, 1, n), cy + r * rng.uniform(-1, 1, n)], 1)
        polys.append([float(v) for v in (np.round(pts, decimals) if decimals is not None else pts).ravel()])
    return polys


def pasted(crop, x0, y0, height, width):
    """The crop put back into an image of ``height`` x ``width`` at (x0, y0), which may be -1."""
    canvas = np.zeros((height + 2, width + 2), np.uint8)
    canvas[y0 + 1:y0 + 1 + crop.shape[0], x0 + 1:x0 + 1 + crop.shape[1]] = crop
    return canvas[1:-1, 1:-1]


def test_crops_paste_back_into_the_image_masks_exactly():
    """Polygons (one decimal, as VIA and our data write them, hits the rasteriser's rounding ties; some reach out of
    the image or lie wholly outside it), RLE both ways and boxes without outlines: every crop, put back where it
    says, is ann_mask's bitmap pixel for pixel; its border is zero, and outside the image repeats the edge."""
    rng = np.random.default_rng(0)
    anns = []
    for i in range(600):
        height, width = (int(v) for v in rng.integers(20, 120, 2))
        anns.append(({"segmentation": random_polygons(rng, height, width, 1 if i % 2 else None),
                      "bbox": [0, 0, 1, 1]}, height, width))
    full = ann_mask(anns[1][0], anns[1][1], anns[1][2])
    rle = mask_utils.encode(np.asfortranarray(full))
    anns += [({"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}, *full.shape),
             ({"segmentation": mask_utils.frPyObjects(anns[1][0]["segmentation"], *full.shape)[0]}, *full.shape),
             ({"segmentation": {"size": list(full.shape), "counts": [0, full.size]}}, *full.shape),  # all ones
             ({"bbox": [3.4, 5.6, 10.2, 7.7]}, 30, 40), ({"bbox": [0, 0, 40, 30]}, 30, 40),
             ({"segmentation": [[200.0, 200.0, 210.0, 200.0, 205.0, 210.0]]}, 30, 40)]  # outside the image
    for ann, height, width in anns:
        crop, x0, y0 = ann_crop(ann, height, width)
        full = ann_mask(ann, height, width)
        assert np.array_equal(pasted(crop, x0, y0, height, width), full), ann
        h, w = crop.shape
        for border, edge, outside in ((crop[:, 0], crop[:, 1], x0 < 0), (crop[:, -1], crop[:, -2], x0 + w > width),
                                      (crop[0], crop[1], y0 < 0), (crop[-1], crop[-2], y0 + h > height)):
            assert np.array_equal(border, edge if outside else np.zeros_like(edge))  # zero within the image


def at_true_place(masks: torch.Tensor, boxes: torch.Tensor, idx, size: int = 28) -> torch.Tensor:
    """torchvision's project_masks_on_boxes with each bin sampled at its true place (``aligned=True``)."""
    rois = torch.cat([idx[:, None].to(boxes), boxes], 1)
    return roi_align(masks[:, None].float(), rois, (size, size), 1.0, aligned=True)[:, 0]


def ours(crops, boxes, frames, idx, image_shape) -> torch.Tensor:
    """Our 28x28 mask targets of ``boxes`` from the crops."""
    return project_masks_on_boxes(crops, _crop_aware_heads_class().boxes_in_crops(boxes, frames[idx], image_shape),
                                  idx, 28)


def crop_targets(masks: torch.Tensor, boxes: torch.Tensor, frames: torch.Tensor, crops: torch.Tensor, idx,
                 image_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The 28x28 mask targets of ``boxes`` sampled at their true places from the full ``masks``, and ours."""
    return at_true_place(masks, boxes, idx), ours(crops, boxes, frames, idx, image_shape)


def objects(rng, height, width, count):
    anns = []
    for _ in range(count):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, 25)
        t = np.sort(rng.uniform(0, 2 * np.pi, 9))
        radius = r * rng.uniform(0.5, 1, 9)
        anns.append({"segmentation": [[round(float(v), 1) for v in
                                       np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], 1).ravel()]]})
    full = torch.from_numpy(np.stack([ann_mask(a, height, width) for a in anns]))
    return anns, full


def proposals_near(rng, full: torch.Tensor, per_object: int = 20):
    """Boxes around each object's mask, jittered as positive proposals are, within the image."""
    boxes, idx = [], []
    for i, mask in enumerate(full):
        ys, xs = np.nonzero(mask.numpy())
        if len(ys) < 50:  # slivers a zoom leaves at the image's edge: a few pixels resampled decide their targets
            continue
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        size = np.maximum(box[2:] - box[:2], 2)
        jitter = rng.uniform(-0.3, 0.3, (per_object, 4)) * np.concatenate([size, size])
        boxes.append(box + jitter)
        idx += [i] * per_object
    height, width = full.shape[-2:]  # proposals are clipped to the image, as torchvision's RPN clips them
    boxes = np.clip(np.concatenate(boxes), 0, [width, height, width, height])
    return torch.from_numpy(boxes).float(), torch.tensor(idx)


def moved(anns, factor, shift):
    """The annotations' polygons zoomed by ``factor`` (x, y) and moved by ``-shift`` (x, y), in pixels."""
    out = []
    for ann in anns:
        polys = [np.asarray(p, np.float64).reshape(-1, 2) * factor - shift for p in ann["segmentation"]]
        out.append({"segmentation": [p.ravel().tolist() for p in polys]})
    return out


def test_cropped_targets_sample_the_masks_at_their_true_place_through_flips_and_the_models_resize():
    """Where the image keeps its scale, the 28x28 targets of positive proposals sampled from the crops are those of
    the image-sized masks sampled at each bin's true place (roi_align aligned=True; torchvision's own are half a
    pixel off, see the round-trip test) within float rounding, also after a flip. Through a zoom (RandomScale) or
    the model's resize, torchvision resamples image-sized bitmaps (nearest neighbour), we move the proposals into
    the unchanged crops. Compared with the outlines rasterised at the new scale, ours are closer through the zoom
    and as close through an 8.9x resize (a bitmap of 90 px sampled 8.9 times finer, bilinear or nearest)."""
    rng = np.random.default_rng(1)
    height, width = 90, 120
    anns, _ = objects(rng, height, width, 6)
    anns += [{"segmentation": [[100.0, 60.0, 125.0, 55.0, 130.0, 95.0, 105.0, 80.0]]},  # over the right and bottom
             {"segmentation": [[-5.0, -3.0, 20.0, 5.0, 10.0, 25.0]]}]  # and the left and top edges
    full = torch.from_numpy(np.stack([ann_mask(a, height, width) for a in anns]))
    target = cropped_masks(anns, height, width)
    boxes, idx = proposals_near(rng, full)
    want, got = crop_targets(full, boxes, target["mask_frames"], target["mask_crops"], idx, (height, width))
    assert want.sum() > 100 and torch.allclose(got, want, atol=1e-4)

    image = torch.zeros(3, height, width, dtype=torch.uint8)
    both = {"boxes": torch.tensor([[0, 0, 50, 50]] * len(anns), dtype=torch.float32),
            "labels": torch.ones(len(anns), dtype=torch.int64), "masks": full, **target}
    _, flipped = RandomHorizontalFlip(1.0, 0)(image, both)
    boxes, idx = proposals_near(rng, flipped["masks"])
    want, got = crop_targets(flipped["masks"], boxes, flipped["mask_frames"], flipped["mask_crops"], idx,
                             (height, width))
    assert torch.allclose(got, want, atol=1e-4)

    def errors(masks, frames, crops, truth_anns, shape, content=None):
        truth = torch.from_numpy(np.stack([ann_mask(a, *shape) for a in truth_anns]))
        if content is not None:  # zoomed out: the padding beyond the image's old right and bottom edges is no object
            truth[:, round(content[1]):] = 0
            truth[:, :, round(content[0]):] = 0
        boxes, idx = proposals_near(rng, truth)
        exact, mine = crop_targets(truth, boxes, frames, crops, idx, shape)
        theirs = project_masks_on_boxes(masks, boxes, idx, 28)
        return (theirs - exact).abs().mean(), (mine - exact).abs().mean()

    for seed, (low, high) in enumerate(((1.3, 1.5), (0.6, 0.8))):
        _, zoomed = RandomScale(low, high, seed)(image, both)
        frames = zoomed["mask_frames"]
        factor = (target["mask_frames"][:, 2:] / frames[:, 2:])[0].numpy()
        shift = ((target["mask_frames"][:, :2] * torch.from_numpy(factor) - frames[:, :2])[0]).numpy() * [width,
                                                                                                          height]
        theirs, mine = errors(zoomed["masks"], frames, zoomed["mask_crops"], moved(anns, factor, shift),
                              (height, width), content=factor * [width, height] - shift)
        assert mine < min(theirs, 0.03), (low, high, float(mine), float(theirs))

    # the model's resize (as torchvision resizes masks: nearest, the scale recomputed from the sizes)
    resized = torch.nn.functional.interpolate(full[:, None].float(), scale_factor=800 / 90,
                                              recompute_scale_factor=True)[:, 0].byte()
    ratio = np.array([resized.shape[-1] / width, resized.shape[-2] / height])
    theirs, mine = errors(resized, target["mask_frames"], target["mask_crops"], moved(anns, ratio, 0),
                          tuple(resized.shape[-2:]))
    assert mine < min(1.1 * theirs, 0.03), (float(mine), float(theirs))  # 0.025 against 0.024 when written


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.0, 1.5, 3.0])
def test_targets_pasted_back_by_torchvisions_inference_land_on_their_objects(scale):
    """The round trip a perfect mask head makes: each object's box as the proposal in the resized image, its 28x28
    target, pasted back into the original image as torchvision's inference pastes predicted masks. Ours land
    within 0.1 px of the objects (centroid) at every scale; torchvision's targets (image-sized masks resized
    nearest-neighbour, sampled half a pixel off) land up to half a pixel up and left, by an amount that depends on
    the scale, with a lower IoU at every scale here. (Ours sample the same crops at every scale: what varies
    with the scale is torchvision's copy of the masks.)"""
    rng = np.random.default_rng(3)
    height, width = 96, 128
    anns, full = objects(rng, height, width, 40)
    keep = full.flatten(1).sum(1) >= 30
    full = full[keep]
    anns = [a for a, k in zip(anns, keep) if k]
    boxes = torch.from_numpy(np.stack([mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m))) for m in
                                       full.numpy()])).float()
    boxes[:, 2:] += boxes[:, :2]  # the tight box of each mask, x1 y1 x2 y2
    target, idx = cropped_masks(anns, height, width), torch.arange(len(full))
    resized = torch.nn.functional.interpolate(full[:, None].float(), scale_factor=scale,
                                              recompute_scale_factor=True)[:, 0].byte()
    shape = tuple(resized.shape[-2:])
    ratio = torch.tensor([shape[1] / width, shape[0] / height] * 2)
    results = {}
    for kind, targets in (("theirs", project_masks_on_boxes(resized, boxes * ratio, idx, 28)),
                          ("ours", ours(target["mask_crops"], boxes * ratio, target["mask_frames"], idx, shape))):
        back = paste_masks_in_image(targets[:, None], boxes, (height, width), padding=1)[:, 0] > 0.5
        truth = full.bool()
        iou = ((back & truth).flatten(1).sum(1) / (back | truth).flatten(1).sum(1)).mean()
        offsets = centroids(back) - centroids(truth)  # per object, x and y
        results[kind] = float(iou), offsets.mean(0).abs().max().item(), offsets.abs().mean().item()
    assert results["ours"][1] < 0.1 and results["ours"][0] > results["theirs"][0], results
    assert results["ours"][2] < 0.7 * results["theirs"][2], results  # object by object too, not only on average
    if scale == 1.0:  # no resize: torchvision's half pixel, alone
        assert results["theirs"][1] > 0.3, results


def test_random_scale_drops_the_crops_of_dropped_objects():
    rng = np.random.default_rng(2)
    anns, full = objects(rng, 64, 64, 3)
    boxes = torch.tensor([[0, 0, 10, 10], [50, 50, 64, 64], [20, 20, 40, 40]], dtype=torch.float32)
    target = {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "masks": full, **cropped_masks(anns, 64, 64)}
    scale = RandomScale(2.0, 2.0, 0)
    scale.generator.manual_seed(0)
    _, out = scale(torch.zeros(3, 64, 64, dtype=torch.uint8), target)
    kept = len(out["labels"])
    assert kept < 3 and len(out["mask_crops"]) == len(out["mask_frames"]) == len(out["masks"]) == kept


def test_a_mask_model_trains_alike_on_cropped_and_full_targets(tiny_coco, monkeypatch):
    """Same seed, same batch, no resize (64 px images, min_size 64): the losses are equal, loss_mask within float
    rounding when torchvision samples its full masks at the bins' true places as ours do; gradients flow; an image
    without objects is fine."""
    def batch(mask_targets):
        dataset = CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw", with_masks=True,
                                mask_targets=mask_targets)
        items = [dataset[i] for i in range(3)]
        empty = {k: v[:0] for k, v in items[0][1].items() if torch.is_tensor(v)}
        return [im.float() / 255 for im, _ in items] + [items[0][0].float() / 255], [t for _, t in items] + [empty]

    losses = {}
    for kind in ("full", "cropped"):
        images, targets = batch(kind)
        assert ("mask_crops" in targets[0]) == (kind == "cropped") and ("masks" in targets[0]) == (kind == "full")
        torch.manual_seed(0)
        model = build_model("maskrcnn", "resnet10", 5, min_size=64, max_size=64, fpn_channels=64).train()
        torch.manual_seed(1)
        with monkeypatch.context() as patch:
            if kind == "full":
                patch.setattr(roi_heads, "project_masks_on_boxes", at_true_place)
            losses[kind] = model(images, targets)
        sum(losses[kind].values()).backward()
        assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    full, cropped = losses["full"], losses["cropped"]
    assert set(full) == set(cropped) and full["loss_mask"] > 0.1
    for key in full:
        assert torch.allclose(full[key], cropped[key], atol=1e-5), key


def test_prediction_sets_hold_no_masks_and_bad_choices_are_refused(tiny_coco):
    coco, raw = tiny_coco / "coco/train.json", tiny_coco / "raw"
    _, target = CocoDetection(coco, raw, with_masks=True, mask_targets="none")[0]
    assert not {"masks", "mask_crops", "mask_frames"} & set(target)
    _, target = CocoDetection(coco, raw, mask_targets="cropped")[0]  # a box model's set: no masks whatever the key
    assert not {"masks", "mask_crops"} & set(target)
    with pytest.raises(DetpipeError, match="mask targets 'crop': choose one of cropped, full, none"):
        CocoDetection(coco, raw, with_masks=True, mask_targets="crop")


def test_the_crop_aware_mask_model_unpickles_and_trains_without_detpipe(tiny_coco, tmp_path):
    """MLflow logs the model with cloudpickle: the RoI heads' class travels by value (loads without detpipe)."""
    torch.manual_seed(0)
    model = build_model("maskrcnn", "resnet10", 5, min_size=64, max_size=64, fpn_channels=64)
    dataset = CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw", with_masks=True, mask_targets="cropped")
    image, target = dataset[0]
    code = ("losses = m.train()([io['image']], [io['target']]); "
            "print(json.dumps([type(m.roi_heads).__name__, sorted(losses), bool(losses['loss_mask'] > 0)]))")
    assert without_detpipe(tmp_path, model, {"image": image.float() / 255, "target": target}, code) == [
        "CropAwareRoIHeads", ["loss_box_reg", "loss_classifier", "loss_mask",
                                                             "loss_objectness", "loss_rpn_box_reg"], True]


def test_bench_mask_targets_measures_both_kinds_on_the_same_items(tmp_path):
    """benchmarks/bench_mask_targets at toy sizes: both kinds load the same objects; the crops weigh less."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_mask_targets", "--images", "4", "--batch", "2",
                           "--iters", "1", "--min-size", "96", "--max-size", "128", "--json",
                           str(tmp_path / "m.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    full, cropped = json.loads((tmp_path / "m.json").read_text())["results"]
    assert (full["mask_targets"], cropped["mask_targets"]) == ("full", "cropped")
    assert full["objects_per_image"] == cropped["objects_per_image"] > 1
    assert 0 < cropped["mask_target_kb_per_image"] < full["mask_target_kb_per_image"]
    assert cropped["resized_mask_mb_per_batch"] > 0 < full["resized_mask_mb_per_batch"]  # which is less: the sizes'
    assert all(np.isfinite(r["loss_mask"]).all() and r["train_s_per_iter"] > 0 for r in (full, cropped))
    assert "cropped/full: loading" in done.stdout


def test_bench_mask_round_trip_scores_both_kinds_on_the_same_objects(tmp_path):
    """benchmarks/bench_mask_round_trip at a toy size: both kinds on the same objects, IoUs in (0, 1]."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_mask_round_trip", "--images", "3", "--sizes", "96",
                           "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    full, cropped = json.loads((tmp_path / "r.json").read_text())["results"]
    assert (full["mask_targets"], cropped["mask_targets"], full["size"]) == ("full", "cropped", 96)
    assert full["objects"] == cropped["objects"] > 0
    assert all(0 < r["mean_iou"] <= 1 and np.isfinite([r["offset_x"], r["offset_y"]]).all() for r in (full, cropped))


def test_cropped_targets_are_mapped_in_float32_under_autocast():
    """Under bf16 autocast the RPN hands bf16 proposals: their place in the crops is computed in float32 (in bf16 a
    coordinate relative to an 800 px image rounds to steps of 2-4 px)."""
    boxes = torch.tensor([[400.3, 300.7, 460.2, 380.9]])
    frames = torch.tensor([[390 / 1067, 290 / 800, 1067.0, 800.0]])
    heads = _crop_aware_heads_class()
    assert torch.allclose(heads.boxes_in_crops(boxes, frames, (800, 1067)),
                          boxes - torch.tensor([390.5, 290.5, 390.5, 290.5]), atol=1e-3)  # pixel i at i
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = heads.boxes_in_crops(boxes.bfloat16(), frames, (800, 1067))
    want = heads.boxes_in_crops(boxes.bfloat16().float(), frames, (800, 1067))
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-3)


def test_the_crop_aware_heads_refuse_mixed_or_mistyped_targets(tiny_coco):
    dataset = CocoDetection(tiny_coco / "coco/train.json", tiny_coco / "raw", with_masks=True, mask_targets="cropped")
    (image, target), (other, full) = dataset[0], (dataset[1][0], dict(dataset[1][1]))
    full.pop("mask_crops"), full.pop("mask_frames")
    torch.manual_seed(0)
    model = build_model("maskrcnn", "resnet10", 5, min_size=64, max_size=64, fpn_channels=64).train()
    images = [image.float() / 255, other.float() / 255]
    with pytest.raises(ValueError, match="every target needs mask_crops and mask_frames, or none of them"):
        model(images, [target, dict(full, masks=torch.zeros(len(full["boxes"]), 64, 64, dtype=torch.uint8))])
    with pytest.raises(TypeError, match="target labels must of int64 type"):
        model(images[:1], [dict(target, labels=target["labels"].int())])


def test_a_zoom_out_leaves_nothing_beyond_the_images_old_edges():
    """A crop's border repeats the image's edge (for roi_align's reads up to it). Zoomed out, that edge comes inside
    the image with padding beyond, where a full mask is empty: so is the crop there."""
    height, width = 90, 120
    anns = [{"segmentation": [[80.0, 20.0, 120.0, 20.0, 120.0, 90.0, 80.0, 90.0]]}]  # to the right and bottom edges
    full = torch.from_numpy(np.stack([ann_mask(a, height, width) for a in anns]))
    target = {"boxes": torch.tensor([[80.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1]), "masks": full,
              **cropped_masks(anns, height, width)}
    _, zoomed = RandomScale(0.7, 0.7, 0)(torch.zeros(3, height, width, dtype=torch.uint8), target)
    boxes = torch.tensor([[50.0, 10.0, 90.0, 70.0], [56.0, 14.0, 84.0, 63.0]])  # past the old edges (84, 63), and to
    idx = torch.tensor([0, 0])
    want, got = crop_targets(zoomed["masks"], boxes, zoomed["mask_frames"], zoomed["mask_crops"], idx, (height, width))
    assert want.sum() > 100 and (got - want).abs().max() < 0.5
