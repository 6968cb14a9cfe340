"""detpipe.models: the small models exactly as before, every torchvision builder by name, weights by name (served
here, never from the internet) or file, post-processing params passed through."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import torchvision

from detpipe import config, models
from detpipe.errors import DetpipeError
from detpipe.models import ARCH_DEFAULT, BUILDERS, build_model, has_masks, load_checkpoint, load_weights
from tests.conftest import ROOT, serve_folder, without_detpipe

SMALL_BUILDER = "ssdlite320_mobilenet_v3_large"  # the quickest builder with COCO weights (2-3 M parameters)


def digest(model) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def postprocess(model) -> tuple:
    heads = getattr(model, "roi_heads", model)
    return heads.score_thresh, heads.nms_thresh, heads.detections_per_img


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# --- the small models: built exactly as before the builders and the post-processing keys were added ---------------

# seed 0, 5 classes, min/max_size 128: digests of the state_dict and the post-processing of the construction
# before this change (git fb648c1); the default params' fcos-resnet18-128 is among them, so its metrics cannot move
BEFORE = [
    ("fasterrcnn", "resnet18", 64, "187f5051e0a8ae9c", (0.05, 0.5, 100)),
    ("maskrcnn", "resnet18", 64, "009d78325a3666b2", (0.05, 0.5, 100)),
    ("retinanet", "resnet18", 64, "8b57dba8bf96bb86", (0.05, 0.5, 300)),
    ("fcos", "resnet18", 128, "fadef766172dd029", (0.05, 0.6, 100)),
    ("ssdlite", "mobilenet_v3_large", 64, "533e7747a958f184", (0.001, 0.55, 300)),
    ("fasterrcnn", "mobilenet_v3_large", 64, "191fb02b41448d0e", (0.05, 0.5, 100)),
]


@pytest.mark.parametrize("name, backbone, fpn, expected, post", BEFORE)
def test_small_models_are_built_as_before_with_the_default_params(name, backbone, fpn, expected, post):
    defaults = {k: spec.default for k, spec in config.SCHEMA["model"].items() if spec.default is not config.REQUIRED}
    assert defaults == {"weights": "", "score_thresh": -1.0, "nms_thresh": -1.0, "detections_per_img": -1,
                        "pyramid_levels": 5, "backbone_stages": 4, "fixed_canvas": False}
    torch.manual_seed(0)
    # changed on purpose since: the small maskrcnn's mask head is as wide as the pyramid unless told otherwise
    head = {"mask_head_channels": 256} if name == "maskrcnn" else {}
    model = build_model(name, backbone, 5, min_size=128, max_size=128, fpn_channels=fpn, **defaults, **head)
    if name == "fcos":  # changed on purpose since: the box regression's bias starts at 1 (_live_box_regression)
        bias = model.head.regression_head.bbox_reg.bias
        assert torch.equal(bias, torch.ones_like(bias))
        torch.nn.init.zeros_(bias)
    assert digest(model) == expected and postprocess(model) == post
    assert model.weights_not_loaded == []
    size = (128, 128) if name == "ssdlite" else None
    assert model.transform.fixed_size == size and (name == "ssdlite" or model.transform.min_size == (128,))


@pytest.mark.parametrize("name, backbone", [("fcos", "resnet10"), ("fcos_resnet50_fpn", "")])
@pytest.mark.parametrize("seed", [0, 3])
def test_fcos_box_regression_starts_with_every_output_alive(name, backbone, seed):
    """torchvision's regression head ends in a ReLU: with its bias at 0, about half of the outputs start at 0 and
    get no gradient. Built by detpipe from scratch, (almost) every output of a fresh model is positive, whatever the
    seed: all of them with the default's 64-channel pyramid; the R50 head's 256 channels spread them wider."""
    torch.manual_seed(seed)
    model = build_model(name, backbone, 5, min_size=96, max_size=96, fpn_channels=64).eval()
    images, _ = model.transform([torch.rand(3, 96, 96) for _ in range(2)])
    features = list(model.backbone(images.tensors).values())
    with torch.no_grad():
        boxes = model.head.regression_head(features)[0]
    alive = (boxes > 0).float().mean()
    assert boxes.shape[-1] == 4 and (alive == 1 if name == "fcos" else alive > 0.99), float(alive)
    torch.nn.init.zeros_(model.head.regression_head.bbox_reg.bias)  # torchvision's initialisation
    with torch.no_grad():
        dead = (model.head.regression_head(features)[0] == 0).float().mean()
    assert 0.2 < dead < 0.8


def test_fcos_rejects_too_narrow_pyramid():
    with pytest.raises(DetpipeError, match="model.fpn_channels: fcos needs a multiple of 32 of at least 64"):
        build_model("fcos", "resnet18", 5, min_size=64, max_size=64, fpn_channels=32)


@pytest.mark.parametrize("name", ["fcos", "retinanet"])
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_one_stage_heads_predict_from_the_finest_levels(name, levels):
    """pyramid_levels keeps the head on P3..P(2+levels): the backbone returns those maps only, the anchors are
    torchvision's for those levels, every parameter is trained (no dead convolution for DDP to trip on), and the
    state_dict is the full pyramid's less the convolutions of the dropped maps."""
    torch.manual_seed(0)
    model = build_model(name, "resnet10", 3, min_size=128, max_size=128, fpn_channels=64, pyramid_levels=levels)
    full = build_model(name, "resnet10", 3, min_size=128, max_size=128, fpn_channels=64)
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0], [10.0, 20.0, 120.0, 110.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    features = model.backbone(model.transform(images)[0].tensors)
    assert [f.shape[-1] for f in features.values()] == [16, 8, 4, 2, 1][:levels]  # strides 8, 16, 32, 64, 128
    per_location = model.anchor_generator.num_anchors_per_location()
    assert per_location == [1 if name == "fcos" else 9] * levels
    assert model.anchor_generator.sizes == full.anchor_generator.sizes[:levels]
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    dropped = set(full.state_dict()) - set(model.state_dict())
    assert set(model.state_dict()) < set(full.state_dict())
    assert all(k.startswith(("backbone.fpn.layer_blocks.", "backbone.fpn.extra_blocks.")) for k in dropped)
    with torch.no_grad():
        out = model.eval()(images[:1])
    assert set(out[0]) >= {"boxes", "scores", "labels"}


@pytest.mark.parametrize("name, backbone, stages, levels", [
    ("fcos", "resnet10", 3, 1), ("fcos", "resnet10", 3, 2), ("fcos", "resnet10", 2, 1),
    ("retinanet", "resnet10", 3, 1), ("retinanet", "resnet10", 3, 2), ("retinanet", "resnet10", 2, 1),
    ("fcos", "resnet50", 2, 1),  # bottleneck blocks: four times the channels out of each stage
])
def test_one_stage_models_build_fewer_backbone_stages(name, backbone, stages, levels):
    """backbone_stages builds the ResNet's first stages only: the stages after the last are not in the model (no
    parameter, no time), the top-down pathway starts from the last one built, the maps are the same sizes, every
    parameter is trained, and the state_dict is the four-stage model's less the dropped stages and their FPN
    convolutions."""
    torch.manual_seed(0)
    model = build_model(name, backbone, 3, min_size=128, max_size=128, fpn_channels=64, pyramid_levels=levels,
                        backbone_stages=stages)
    full = build_model(name, backbone, 3, min_size=128, max_size=128, fpn_channels=64, pyramid_levels=levels)
    kept = [f"layer{k}" for k in range(1, stages + 1)]
    assert [n for n, _ in model.backbone.body.named_children()] == ["conv1", "bn1", "relu", "maxpool", *kept]
    assert len(model.backbone.fpn.inner_blocks) == stages - 1  # C3 .. C(stages + 1)
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0], [10.0, 20.0, 120.0, 110.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    features = model.backbone(model.transform(images)[0].tensors)
    assert [f.shape[-1] for f in features.values()] == [16, 8][:levels]
    assert model.anchor_generator.sizes == full.anchor_generator.sizes
    sum(model(images, targets).values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    dropped = set(full.state_dict()) - set(model.state_dict())
    assert set(model.state_dict()) < set(full.state_dict())
    fpn_dropped = tuple(f"backbone.fpn.{b}.{i}." for b in ("inner_blocks", "layer_blocks")
                        for i in range(stages - 1, 3))
    body_dropped = tuple(f"backbone.body.layer{k}." for k in range(stages + 1, 5))
    assert all(k.startswith(fpn_dropped + body_dropped) for k in dropped)
    assert any(k.startswith(body_dropped) for k in dropped)
    with torch.no_grad():
        assert set(model.eval()(images[:1])[0]) >= {"boxes", "scores", "labels"}


@pytest.mark.parametrize("name, levels, stages, message", [
    ("fcos", 0, 4, "model.pyramid_levels must be from 1 (P3 alone) to 5 (P3-P7), got 0"),
    ("retinanet", 6, 4, "model.pyramid_levels must be from 1"),
    ("fcos", 1, 1, "model.backbone_stages must be from 2 (C2-C3) to 4 (C2-C5), got 1"),
    ("retinanet", 1, 5, "model.backbone_stages must be from 2"),
    ("fcos", 3, 3, "model.pyramid_levels 3 needs model.backbone_stages >= 4: backbone_stages 3 builds P3-P4, at most 2 "
                   "levels"),
    ("retinanet", 2, 2, "model.pyramid_levels 2 needs model.backbone_stages >= 3: backbone_stages 2 builds P3 only, 1 "
                        "level"),
])
def test_pyramid_levels_and_backbone_stages_out_of_range_are_refused(name, levels, stages, message):
    with pytest.raises(DetpipeError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        build_model(name, "resnet18", 3, min_size=64, max_size=64, fpn_channels=64, pyramid_levels=levels,
                    backbone_stages=stages)
    one_line(exc)


def _refusal(check, *args, **kwargs) -> str | None:
    try:
        check(*args, **kwargs)
    except DetpipeError as exc:
        return str(exc)
    return None


def test_params_and_builder_refuse_the_same_pyramids():
    """config.check_pyramid (run when params are read, before a stage opens a run) and build_model refuse the same
    combinations of model, pyramid_levels and backbone_stages, with the same message."""
    for name in ("fcos", "retinanet", "fasterrcnn"):
        for levels in range(1, 6):
            for stages in range(2, 5):
                from_params = _refusal(config.check_pyramid, name, levels, stages)
                from_builder = _refusal(build_model, name, "resnet10", 3, min_size=64, max_size=64, fpn_channels=64,
                                        pyramid_levels=levels, backbone_stages=stages)
                assert from_params == from_builder, (name, levels, stages)
                assert (from_params is None) == (name == "fasterrcnn" or stages == 4 or levels < stages), from_params


@pytest.mark.parametrize("name", ["fasterrcnn", "fcos_resnet50_fpn"])
def test_other_models_ignore_pyramid_levels_and_backbone_stages(name):
    """As builder names ignore fpn_channels: switching model.name away from the default's fcos (which sets
    pyramid_levels 1 and backbone_stages 2) builds the model as it always was."""
    built = []
    for levels, stages in ((1, 2), (2, 3), (5, 4)):
        torch.manual_seed(0)
        built.append(digest(build_model(name, "resnet10", 3, min_size=64, max_size=64, fpn_channels=64,
                                        pyramid_levels=levels, backbone_stages=stages)))
    assert built[0] == built[1] == built[2]


# --- model.fixed_canvas: batches padded to a few fixed sizes ----------------------------------------------------

@pytest.mark.parametrize("height, width, min_size, max_size, canvas", [
    (800, 1333, 800, 1333, (800, 1344)),  # landscape
    (1333, 800, 800, 1333, (1344, 800)),  # portrait
    (600, 1333, 800, 1333, (800, 1344)),  # long side capped: the short side is below min_size
    (800, 800, 800, 1333, (800, 1344)),  # square: the landscape canvas holds it
    (1333, 1333, 800, 1333, (1344, 1344)),  # a batch that mixes orientations
    (96, 96, 96, 96, (96, 96)),  # the default's square images: as without it
    (43, 64, 96, 64, (64, 64)),  # max_size below min_size: every side is at most max_size
    (2000, 100, 800, 1333, (2016, 128)),  # larger than every canvas (not resized): padded as torchvision does
])
def test_canvas_size_is_the_first_fixed_canvas_that_holds_the_batch(height, width, min_size, max_size, canvas):
    assert models.canvas_size(height, width, min_size, max_size) == canvas


@pytest.mark.parametrize("name", ["fasterrcnn", "maskrcnn", "retinanet", "fcos"])
def test_fixed_canvas_pads_batches_to_three_shapes_and_keeps_the_images_and_weights(name):
    """Batches of any mix of sizes come out in the three canvases only, each image where torchvision puts it with
    the padding at 0 (the normalised mean); the weights are those of the same seed without it, and it trains."""
    torch.manual_seed(0)
    plain = build_model(name, "resnet10", 3, min_size=64, max_size=96, fpn_channels=64)
    torch.manual_seed(0)
    canvas = build_model(name, "resnet10", 3, min_size=64, max_size=96, fpn_channels=64, fixed_canvas=True)
    assert digest(canvas) == digest(plain) and type(plain.transform) is not type(canvas.transform)
    assert canvas.transform.min_size == (64,) and canvas.transform.max_size == 96
    shapes = set()
    for sizes in ([(50, 70), (60, 60)], [(70, 50)], [(70, 50), (50, 70)], [(40, 100), (33, 47), (64, 64)]):
        images = [torch.rand(3, h, w) for h, w in sizes]
        want, got = plain.transform.eval()(images)[0], canvas.transform.eval()(images)[0]
        assert got.image_sizes == want.image_sizes
        shapes.add(tuple(got.tensors.shape[-2:]))
        for i, (h, w) in enumerate(got.image_sizes):
            assert torch.equal(got.tensors[i, :, :h, :w], want.tensors[i, :, :h, :w])
            padded = got.tensors[i].clone()
            padded[:, :h, :w] = 0
            assert not padded.any()
    assert shapes == {(64, 96), (96, 64), (96, 96)}
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 50, 70, dtype=torch.uint8)}, {"boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 70, 50, dtype=torch.uint8)}]
    targets[0]["masks"][0, 5:40, 5:30] = 1
    losses = canvas.train()([torch.rand(3, 50, 70), torch.rand(3, 70, 50)], targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    out = canvas.eval()([torch.rand(3, 50, 70)])[0]["boxes"]
    assert out.numel() == 0 or (out[:, 2].max() <= 70 and out[:, 3].max() <= 50)  # clipped to the image


@pytest.mark.parametrize("name", ["fasterrcnn", "maskrcnn"])
def test_fixed_canvas_sets_the_roi_poolers_scales_whatever_the_first_batch(name):
    """A wide first image leaves half the canvas's height as padding; torchvision's RoI poolers would guess their
    scales from that first batch twice too large, for good. They are the backbone's strides (1/4 ... 1/32)."""
    torch.manual_seed(0)
    plain = build_model(name, "resnet10", 3, min_size=96, max_size=96, fpn_channels=64).eval()
    torch.manual_seed(0)
    canvas = build_model(name, "resnet10", 3, min_size=96, max_size=96, fpn_channels=64, fixed_canvas=True).eval()
    assert digest(canvas) == digest(plain)  # the scales come from an eval-mode forward: BatchNorm stats untouched
    with torch.no_grad():
        plain([torch.rand(3, 96, 96)])  # square: torchvision's guess is right
        boxes = canvas([torch.rand(3, 60, 120)])[0]["boxes"]  # resized to 48x96, padded to 96x96
    pools = lambda m: [p for p in (m.roi_heads.box_roi_pool, m.roi_heads.mask_roi_pool) if p is not None]
    assert len(pools(canvas)) == (2 if name == "maskrcnn" else 1)
    for a, b in zip(pools(plain), pools(canvas)):
        assert b.scales == a.scales == [0.25, 0.125, 0.0625, 0.03125]
        assert (b.map_levels.k_min, b.map_levels.k_max) == (a.map_levels.k_min, a.map_levels.k_max)
    assert boxes.numel() == 0 or (boxes[:, 2].max() <= 120 and boxes[:, 3].max() <= 60)


def test_a_canvas_model_unpickles_and_predicts_without_detpipe(tmp_path):
    """MLflow logs the model with cloudpickle: the canvas class travels by value, so the model loads where detpipe is
    not installed (as tests/test_tracking.py checks for the default model), pads its batch as here and predicts.
    (Within float rounding: the resize's kernels can round differently in another process, and then an untrained
    model's near-tied boxes come out in another order, so those are not compared.)"""
    torch.manual_seed(0)
    model = build_model("fasterrcnn", "resnet10", 3, min_size=64, max_size=96, fpn_channels=64,
                        fixed_canvas=True).eval()
    image = torch.rand(3, 50, 70)
    code = ("batch = m.transform([io['image']])[0].tensors; out = m([io['image']])[0]; "
            "print(json.dumps([type(m.transform).__name__, torch.allclose(batch, io['batch'], atol=1e-4), "
            "list(out['boxes'].shape[1:]), m.roi_heads.box_roi_pool.scales]))")
    inputs = {"image": image, "batch": model.transform([image])[0].tensors}
    assert without_detpipe(tmp_path, model, inputs, code) == ["CanvasTransform", True, [4],
                                                              [0.25, 0.125, 0.0625, 0.03125]]


def test_ssd_models_ignore_fixed_canvas():
    """SSD resizes every image to one square already: its transform stays torchvision's."""
    torch.manual_seed(0)
    model = build_model("ssdlite", "mobilenet_v3_large", 3, min_size=64, max_size=64, fixed_canvas=True)
    assert type(model.transform) is torchvision.models.detection.transform.GeneralizedRCNNTransform


def test_checkpoints_rebuild_their_fixed_canvas(tmp_path):
    """meta.model.fixed_canvas rebuilds the padding; a checkpoint saved before the key pads as torchvision does."""
    params = {"name": "fasterrcnn", "backbone": "resnet10", "fpn_channels": 64, "pretrained_backbone": False,
              "min_size": 64, "max_size": 96}
    torch.manual_seed(0)
    model = build_model("fasterrcnn", "resnet10", 3, min_size=64, max_size=96, fpn_channels=64, fixed_canvas=True)
    canvas_class = type(model.transform)
    for meta_model, cls in (({**params, "fixed_canvas": True}, canvas_class),
                            (params, torchvision.models.detection.transform.GeneralizedRCNNTransform)):
        torch.save({"model": model.state_dict(), "meta": {"model": meta_model, "classes": ["a", "b"],
                                                          "cat_ids": [1, 2]}}, tmp_path / "model.pt")
        loaded, _ = load_checkpoint(tmp_path / "model.pt")
        assert type(loaded.transform) is cls and digest(loaded) == digest(model)


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
    with pytest.raises(DetpipeError, match="retinanet needs a resnet backbone"):
        build_model("retinanet", "mobilenet_v3_large", 3, min_size=64, max_size=64)


# --- torchvision's builders by name -------------------------------------------------------------------------------

def test_the_lists_agree():
    assert config.ARCHITECTURES == models.ARCHITECTURES == models.SMALL + BUILDERS
    assert [n for n in models.ARCHITECTURES if has_masks(n)] == ["maskrcnn", "maskrcnn_resnet50_fpn",
                                                                 "maskrcnn_resnet50_fpn_v2"]
    for name in BUILDERS:  # each is a torchvision builder with COCO weights, documented in docs/models.md
        assert "COCO_V1" in torchvision.models.get_model_weights(name).__members__
        assert f"`{name}`" in (ROOT / "docs/models.md").read_text()


@pytest.mark.parametrize("name", BUILDERS)  # 0.1-2 s each on an idle 2-core CPU, ~5 s in all
def test_every_builder_predicts(name):
    torch.manual_seed(0)
    model = build_model(name, "resnet18", 3, min_size=64, max_size=64)  # the backbone is ignored
    assert model.weights_not_loaded == []
    assert all(p.requires_grad for p in model.parameters())  # no weights: all trainable, as torchvision's
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 64, 64)])
    assert set(out[0]) >= {"boxes", "scores", "labels"} | ({"masks"} if has_masks(name) else set())
    assert out[0]["boxes"].shape[1] == 4 and all(0 < label < 3 for label in out[0]["labels"].tolist())
    ssd = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}
    expected = (ssd[name],) * 2 if name in ssd else None
    assert model.transform.fixed_size == expected and (name in ssd or model.transform.min_size == (64,))


@pytest.mark.parametrize("name, attrs", [
    ("fasterrcnn_mobilenet_v3_large_320_fpn", (0.05, 0.5, 100)),
    (SMALL_BUILDER, (0.001, 0.55, 300)),
    ("fasterrcnn", (0.05, 0.5, 100)),
    ("fcos", (0.05, 0.6, 100)),
    ("ssdlite", (0.001, 0.55, 300)),
])
def test_postprocessing_params_pass_through(name, attrs):
    backbone = "mobilenet_v3_large" if name == "ssdlite" else "resnet18"
    kw = {"min_size": 64, "max_size": 64, "fpn_channels": 64}
    assert postprocess(build_model(name, backbone, 3, **kw)) == attrs  # -1: the architecture's default
    model = build_model(name, backbone, 3, score_thresh=0.3, nms_thresh=0.4, detections_per_img=7, **kw)
    assert postprocess(model) == (0.3, 0.4, 7)


@pytest.mark.parametrize("key, value, message", [
    ("score_thresh", -0.5, "model.score_thresh must be -1 (the architecture's default) or from 0 to 1, got -0.5"),
    ("nms_thresh", 1.5, "model.nms_thresh must be -1"),
    ("detections_per_img", 0, "model.detections_per_img must be -1 (the architecture's default) or at least 1"),
])
def test_bad_postprocessing_values_are_one_line(key, value, message):
    with pytest.raises(DetpipeError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        build_model("fcos", "resnet18", 3, min_size=64, max_size=64, fpn_channels=64, **{key: value})
    one_line(exc)


def test_params_accept_builder_names_and_new_keys(tiny_params):
    cfg = config.load(tiny_params)
    assert (cfg.model.weights, cfg.model.score_thresh, cfg.model.nms_thresh, cfg.model.detections_per_img) == \
        ("", ARCH_DEFAULT, ARCH_DEFAULT, ARCH_DEFAULT)
    cfg = config.load(tiny_params, ["model.name=maskrcnn_resnet50_fpn", "model.weights=COCO_V1",
                                    "model.score_thresh=0.3", "model.detections_per_img=50"])
    assert cfg.model.name == "maskrcnn_resnet50_fpn" and cfg.model.weights == "COCO_V1"
    with pytest.raises(DetpipeError, match="model.score_thresh must be at most 1"):
        config.load(tiny_params, ["model.score_thresh=2"])


# --- weights: by name (served on 127.0.0.1 as torchvision's URL would be), by file --------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's hub cache under tmp_path: ``<TORCH_HOME>/hub/checkpoints``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with serve_folder(root) as (base, httpd):
        yield root, base, httpd


def coco_like(builder=SMALL_BUILDER, seed=1):
    """A 91-class (COCO's count) state_dict of ``builder`` with the layout torchvision's weights have."""
    torch.manual_seed(seed)
    return build_model(builder, "resnet18", 91, min_size=64, max_size=64, weights="COCO_V1", load=False).state_dict()


def serve(www, base, state, stem="tiny_coco", digest_hex=None) -> str:
    """Write ``state`` as torchvision names its files, ``<stem>-<sha256 prefix>.pth``; returns its URL."""
    tmp = www / "tmp.pth"
    torch.save(state, tmp)
    name = f"{stem}-{digest_hex or hashlib.sha256(tmp.read_bytes()).hexdigest()[:10]}.pth"
    tmp.rename(www / name)
    return f"{base}/{name}"


def fake_weights(monkeypatch, url, builder=SMALL_BUILDER):
    """torchvision's weights enum of ``builder`` replaced by one whose COCO_V1 (and DEFAULT) is at ``url``."""
    from torchvision.models import Weights, WeightsEnum

    class Fake(WeightsEnum):
        COCO_V1 = Weights(url=url, transforms=None, meta={"categories": [str(i) for i in range(91)]})
        DEFAULT = COCO_V1

    real = torchvision.models.get_model_weights
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: Fake if name == builder else real(name))


def test_named_weights_download_once_with_their_hash_then_load_offline(hub, server, monkeypatch):
    www, base, httpd = server
    state = coco_like()
    url = serve(www, base, state)
    fake_weights(monkeypatch, url)
    torch.manual_seed(0)
    fresh = build_model(SMALL_BUILDER, "resnet18", 3, min_size=64, max_size=64)
    torch.manual_seed(0)
    model = build_model(SMALL_BUILDER, "resnet18", 3, min_size=64, max_size=64, weights="DEFAULT")
    # 3 classes, not 91: the last conv of each level's classification head keeps its fresh initialisation
    reinit = [f"head.classification_head.module_list.{i}.1.{p}" for i in range(6) for p in ("weight", "bias")]
    assert model.weights_not_loaded == reinit
    own, start = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(own[k], start[k]) for k in reinit)
    assert all(torch.equal(own[k], state[k]) for k in own if k not in reinit)
    assert [p.name for p in hub.iterdir()] == [url.rsplit("/", 1)[-1]]

    httpd.shutdown()  # offline now: the cached file is used, its hash checked again
    for path in www.iterdir():
        path.unlink()
    again = build_model(SMALL_BUILDER, "resnet18", 3, min_size=64, max_size=64, weights="COCO_V1")
    assert all(torch.equal(v, own[k]) for k, v in again.state_dict().items() if k not in reinit)

    cached = next(hub.iterdir())
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DetpipeError, match=r"model.weights: .*: cached weights are damaged .*delete the file") as exc:
        build_model(SMALL_BUILDER, "resnet18", 3, min_size=64, max_size=64, weights="COCO_V1")
    one_line(exc)


def test_a_download_with_the_wrong_hash_is_refused_and_not_kept(hub, server, monkeypatch):
    www, base, _ = server
    url = serve(www, base, coco_like(), digest_hex="0123abcd")
    fake_weights(monkeypatch, url)
    model = build_model(SMALL_BUILDER, "resnet18", 3, min_size=64, max_size=64)
    with pytest.raises(DetpipeError, match=r"tiny_coco-0123abcd.pth: the download does not match the sha256 in its "
                                           r"name \(invalid hash value") as exc:
        load_weights(model, "COCO_V1", SMALL_BUILDER)
    one_line(exc)
    assert list(hub.iterdir()) == []


def test_no_server_is_one_line_naming_where_to_put_the_file(hub, monkeypatch):
    fake_weights(monkeypatch, "http://127.0.0.1:9/none-0123abcd.pth")
    with pytest.raises(DetpipeError, match=r"cannot download .*copy the file to .*checkpoints/none-0123abcd.pth") as e:
        build_model(SMALL_BUILDER, "resnet18", 3, min_size=64, max_size=64, weights="COCO_V1")
    one_line(e)


@pytest.mark.parametrize("name, weights, message", [
    ("fasterrcnn_mobilenet_v3_large_320_fpn", "COCO_V2",
     "model.weights: weights 'COCO_V2': unknown for fasterrcnn_mobilenet_v3_large_320_fpn; choose one of COCO_V1, "
     "DEFAULT, or give the path of a weights file"),
    ("fcos", "COCO_V1", "model.weights: weights 'COCO_V1': named weights are torchvision's, for a builder name"),
    ("fcos", "nothing/here.pth", "model.weights: nothing/here.pth: weights file is missing"),
])
def test_bad_weights_names_are_one_line_before_anything_downloads(hub, name, weights, message):
    with pytest.raises(DetpipeError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        build_model(name, "resnet18", 3, min_size=64, max_size=64, fpn_channels=64, weights=weights)
    one_line(exc)
    assert not hub.exists()


def test_weights_files_state_dicts_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    source = build_model("fcos", "resnet18", 5, min_size=64, max_size=64, fpn_channels=64)
    torch.save(source.state_dict(), tmp_path / "raw.pth")
    torch.save({"model": source.state_dict(), "meta": {"classes": ["a"] * 4}}, tmp_path / "model.pt")
    for path in (tmp_path / "raw.pth", tmp_path / "model.pt"):
        torch.manual_seed(1)
        model = build_model("fcos", "resnet18", 3, min_size=64, max_size=64, fpn_channels=64)
        not_loaded = load_weights(model, str(path), "fcos")
        assert not_loaded == ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items() if k not in not_loaded)


@pytest.mark.parametrize("damage, message", [
    (lambda p, good: p.write_bytes(good[: len(good) // 2]), "not a readable weights file"),
    (lambda p, good: p.write_bytes(b"hello"), "not a readable weights file"),
    (lambda p, good: torch.save({"epoch": 3}, p), "holds no state_dict"),
    (lambda p, good: torch.save(build_model("ssdlite", "mobilenet_v3_large", 3, min_size=64, max_size=64).state_dict(),
                                p), "weights of another architecture: .* of the model's .* tensors are not in them"),
    (lambda p, good: torch.save({k: torch.zeros(2) for k in torch.load(p, weights_only=True)}, p),
     "weights of another backbone or width: most of the model's 154 tensors have other shapes in them"),
])
def test_unusable_weights_files_are_one_line(tmp_path, damage, message):
    model = build_model("fcos", "resnet18", 3, min_size=64, max_size=64, fpn_channels=64)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    damage(path, path.read_bytes())
    before = digest(model)
    with pytest.raises(DetpipeError, match=message) as exc:
        load_weights(model, str(path), "fcos")
    assert one_line(exc).startswith(str(path)) and digest(model) == before


# --- fine-tuning layout: what torchvision's builder does when it loads weights ------------------------------------

@pytest.mark.parametrize("builder", [pytest.param(n, marks=pytest.mark.slow) if n == "ssd300_vgg16" else n
                                     for n in BUILDERS])  # ~1 s each; SSD300's two VGG-16 builds take ~5 s
def test_weights_give_torchvisions_pretrained_layout(builder, monkeypatch):
    """FrozenBatchNorm2d (and its eps), frozen first stages: as torchvision's builder with weights=COCO_V1, whose
    download is replaced by our own state_dict here."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    state = coco_like(builder)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: dict(state))
    size = {} if builder.startswith("ssd") else {"min_size": 64, "max_size": 64}
    theirs = torchvision.models.get_model(builder, weights="COCO_V1", **size)
    ours = build_model(builder, "resnet18", 91, min_size=64, max_size=64, weights="COCO_V1", load=False)
    ours.load_state_dict(state)

    def layout(model):  # a class of ours counts as the torchvision class it derives from (mask models' RoI heads)
        torch_class = lambda m: next(c for c in type(m).__mro__ if c.__module__.startswith("torch")).__name__
        return ([(n, torch_class(m), getattr(m, "eps", None) if isinstance(m, FrozenBatchNorm2d) else None)
                 for n, m in model.named_modules()], [(n, p.requires_grad) for n, p in model.named_parameters()])

    assert layout(ours) == layout(theirs)
    assert (type(getattr(ours, "roi_heads", None)).__name__ == "CropAwareRoIHeads") == builder.startswith("maskrcnn")
    assert any(not p.requires_grad for p in ours.parameters()) != (builder == SMALL_BUILDER)
    assert digest(ours) == digest(theirs)


def test_fine_tuned_checkpoint_loads_without_its_weights(hub, server, monkeypatch, tmp_path):
    """The train stage saves meta.model with model.weights; load_checkpoint rebuilds the same layout without the
    weights (no download, the cache emptied) and predicts the same."""
    www, base, _ = server
    builder = "fasterrcnn_mobilenet_v3_large_320_fpn"
    url = serve(www, base, coco_like(builder), stem=builder)
    fake_weights(monkeypatch, url, builder)
    params = {"name": builder, "backbone": "resnet18", "fpn_channels": 256, "pretrained_backbone": False,
              "min_size": 64, "max_size": 64, "weights": "COCO_V1", "score_thresh": 0.01, "nms_thresh": 0.5,
              "detections_per_img": 20}
    model = build_model(builder, "resnet18", 3, **{k: v for k, v in params.items() if k not in ("name", "backbone")})
    assert model.weights_not_loaded == ["roi_heads.box_predictor.cls_score.weight",
                                        "roi_heads.box_predictor.cls_score.bias",
                                        "roi_heads.box_predictor.bbox_pred.weight",
                                        "roi_heads.box_predictor.bbox_pred.bias"]
    assert not any(p.requires_grad for p in model.backbone.body["0"].parameters())  # frozen first stage
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    sum(model(images, targets).values()).backward()  # one fine-tuning step's gradients: frozen parts get none
    assert model.backbone.body["0"][0].weight.grad is None and model.roi_heads.box_predictor.cls_score.weight.grad \
        is not None
    torch.save({"model": model.state_dict(), "meta": {"model": params, "classes": ["a", "b"], "cat_ids": [1, 2]}},
               tmp_path / "model.pt")
    for path in hub.iterdir():
        path.unlink()
    loaded, meta = load_checkpoint(tmp_path / "model.pt")
    assert list(hub.iterdir()) == [] and meta["classes"] == ["a", "b"] and postprocess(loaded) == (0.01, 0.5, 20)
    with torch.no_grad():
        assert torch.equal(loaded(images)[0]["boxes"], model.eval()(images)[0]["boxes"])


def test_ssdlite_builder_with_an_imagenet_backbone_reloads(monkeypatch, tmp_path):
    """torchvision builds SSDlite without its reduced tail when it loads an ImageNet backbone: load_checkpoint
    rebuilds that shape (the ImageNet download is replaced by a state_dict of the right shape here)."""
    imagenet = torchvision.models.mobilenet_v3_large().state_dict()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: dict(imagenet))
    params = {"name": SMALL_BUILDER, "backbone": "resnet18", "fpn_channels": 256, "pretrained_backbone": True,
              "min_size": 64, "max_size": 64}
    model = build_model(SMALL_BUILDER, "resnet18", 3, min_size=64, max_size=64, pretrained_backbone=True)
    assert digest(model) != digest(build_model(SMALL_BUILDER, "resnet18", 3, min_size=64, max_size=64))
    torch.save({"model": model.state_dict(), "meta": {"model": params, "classes": ["a", "b"], "cat_ids": [1, 2]}},
               tmp_path / "model.pt")
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    assert digest(loaded) == digest(model)


def test_small_maskrcnn_mask_head_follows_the_pyramid_and_old_checkpoints_reload(tmp_path):
    """The small maskrcnn's mask head is fpn_channels wide (torchvision's is 256, 3x slower on a CPU); a checkpoint
    saved with the 256-wide head still loads as it was, since load_checkpoint reads the width from its weights."""
    def mask_widths(model):
        convs = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
        return [c.out_channels for c in convs], model.roi_heads.mask_predictor.conv5_mask.out_channels

    assert mask_widths(build_model("maskrcnn", "resnet10", 3, min_size=64, max_size=64, fpn_channels=32)) == (
        [32] * 4, 32)
    params = {"name": "maskrcnn", "backbone": "resnet10", "fpn_channels": 32, "pretrained_backbone": False,
              "min_size": 64, "max_size": 64}
    images = [torch.rand(3, 64, 64)]
    for width in (32, 256):
        torch.manual_seed(0)
        model = build_model("maskrcnn", "resnet10", 3, min_size=64, max_size=64, fpn_channels=32,
                            mask_head_channels=width, score_thresh=0.0).eval()
        torch.save({"model": model.state_dict(), "meta": {"model": {**params, "score_thresh": 0.0},
                                                          "classes": ["a", "b"], "cat_ids": [1, 2]}},
                   tmp_path / "model.pt")
        loaded, _ = load_checkpoint(tmp_path / "model.pt")
        assert mask_widths(loaded) == ([width] * 4, width) and digest(loaded) == digest(model)
        with torch.no_grad():
            expected, got = model(images)[0], loaded(images)[0]
        assert len(got["masks"]) > 0 and torch.equal(got["masks"], expected["masks"])


def test_checkpoints_rebuild_their_pyramid_levels(tmp_path):
    """meta.model.pyramid_levels and backbone_stages rebuild the head's levels and the backbone's stages; a
    checkpoint saved before the keys existed is P3-P7 on four stages."""
    params = {"name": "fcos", "backbone": "resnet10", "fpn_channels": 64, "pretrained_backbone": False,
              "min_size": 64, "max_size": 64}
    images = [torch.rand(3, 64, 64)]
    for levels, stages, meta_model in ((1, 4, {**params, "pyramid_levels": 1}),
                                       (1, 2, {**params, "pyramid_levels": 1, "backbone_stages": 2}),
                                       (2, 3, {**params, "pyramid_levels": 2, "backbone_stages": 3}),
                                       (5, 4, params)):
        torch.manual_seed(0)
        model = build_model("fcos", "resnet10", 3, min_size=64, max_size=64, fpn_channels=64,
                            pyramid_levels=levels, backbone_stages=stages).eval()
        torch.save({"model": model.state_dict(), "meta": {"model": meta_model, "classes": ["a", "b"],
                                                          "cat_ids": [1, 2]}}, tmp_path / "model.pt")
        loaded, _ = load_checkpoint(tmp_path / "model.pt")
        assert len(loaded.anchor_generator.sizes) == levels and digest(loaded) == digest(model)
        assert hasattr(loaded.backbone.body, "layer4") == (stages == 4)
        with torch.no_grad():
            assert torch.equal(loaded(images)[0]["scores"], model(images)[0]["scores"])


def test_bench_canvas_counts_the_batch_shapes_of_a_dataset(tmp_path):
    """benchmarks/bench_canvas on a COCO file's sizes: with the canvas every batch is one of the three canvases;
    without it, the shapes are torchvision's (each side rounded up to 32)."""
    sizes = [(480, 640), (640, 480), (427, 640), (300, 500), (500, 300), (612, 612)] * 4
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w}
                       for i, (h, w) in enumerate(sizes, 1)], "annotations": [], "categories": []}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_canvas", "--coco", str(tmp_path / "c.json"),
                           "--batch", "4", "--min-size", "64", "--max-size", "100", "--json", str(tmp_path / "b.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [(r["grouped"], r["fixed_canvas"]) for r in rows] == [(False, False), (False, True), (True, False),
                                                                 (True, True)]
    for row in rows:
        assert row["batches"] == 6 and 0 <= row["padding_share"] < 1
        shapes = [tuple(s) for s, _ in row["most_common"]]
        if row["fixed_canvas"]:
            assert set(shapes) <= {(64, 128), (128, 64), (128, 128)} and row["shapes"] <= 3
        else:
            assert all(h % 32 == 0 and w % 32 == 0 and max(h, w) <= 128 for h, w in shapes)
    assert rows[2]["shapes"] > rows[3]["shapes"]  # grouped by orientation: fewer shapes with the canvas
    assert "shuffled" in done.stdout and "grouped by orientation" in done.stdout
