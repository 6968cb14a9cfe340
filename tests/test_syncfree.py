"""train.sync_free_inputs (detpipe.syncfree): no host-device sync before the backbone, the same training step.

The syncs themselves are counted on a GPU by ``python -m benchmarks.gpu_train_bench --profile``; here the read-backs
are caught on the meta device, where a tensor has no values to read.
"""

import pytest
import torch
import torch.fx.experimental._config
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from detpipe import config, engine
from detpipe.datasets import collate, cropped_masks
from detpipe.errors import DetpipeError
from detpipe.models import build_from_params, build_model
from detpipe.syncfree import SyncFreeFCOSHead, SyncFreeTransform, sync_free_inputs, sync_free_loss
from tests.conftest import ROOT

SIZES = [(96, 128), (70, 101), (123, 77)]  # each resized by another ratio (min_size 80, max_size 120)


def model_of(name: str, **kwargs):
    torch.manual_seed(0)
    backbone = "mobilenet_v3_large" if name == "ssdlite" else "resnet10"
    return build_model(name, backbone, 3, min_size=80, max_size=120, fpn_channels=64 if name == "fcos" else 32,
                       **kwargs).train()


def batch(masks: str | None = None):
    g = torch.Generator().manual_seed(1)
    images, targets = [], []
    for h, w in SIZES:
        images.append(torch.rand(3, h, w, generator=g))
        xy = torch.rand(2, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + 8 + torch.rand(2, 2, generator=g) * 30], 1)
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        anns = [{"bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]}
                for x1, y1, x2, y2 in boxes.tolist()]
        if masks == "cropped":
            target.update(cropped_masks(anns, h, w))
        elif masks == "full":
            full = torch.zeros(2, h, w, dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(full, boxes.round().int().tolist()):
                m[y1:y2, x1:x2] = 1
            target["masks"] = full
        targets.append(target)
    return images, targets


def step(model, masks=None):
    images, targets = batch(masks)
    torch.manual_seed(2)  # the samplers' draws and the transform's choice of size
    losses = model(images, targets)
    sum(losses.values()).backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, masks, canvas", [
    ("fasterrcnn", None, False), ("fasterrcnn", None, True), ("maskrcnn", "cropped", False),
    ("maskrcnn", "full", False), ("retinanet", None, False), ("fcos", None, False), ("ssdlite", None, False)])
def test_a_training_step_gives_the_same_losses_and_gradients_bit_for_bit(name, masks, canvas):
    want_losses, want_grads = step(model_of(name, fixed_canvas=canvas), masks)
    model = model_of(name, fixed_canvas=canvas)
    assert sync_free_inputs(model) and isinstance(model.transform, SyncFreeTransform)
    got_losses, got_grads = step(model, masks)
    assert list(want_losses) == list(got_losses)  # the same names in the same order
    assert all(torch.equal(want_losses[k], got_losses[k]) for k in want_losses)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 10
    assert all(torch.equal(want_grads[k], got_grads[k]) for k in want_grads)


class ReadBacks(TorchDispatchMode):
    """Records each read of a meta tensor's values (what would be a device-to-host sync on a GPU): a number read back
    (read as 0) or a selection by a boolean mask (its count; read as all true, ``meta_nonzero_assume_all_nonzero``);
    and each copy of host data to it (:class:`HostCopies`). ``x[mask] = number`` reads nothing (CUDA fills it in
    place: no sync in the GPU census)."""

    NUMBERS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
    SELECTIONS = (torch.ops.aten.nonzero.default, torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
                  torch.ops.aten.index_put.default, torch.ops.aten.masked_select.default)

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            if func in self.NUMBERS:
                self.reads.append(str(func))
                return 0
            masked_fill = func in (torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default) and (
                not isinstance(args[2], torch.Tensor) or args[2].numel() == 1)  # x[mask] = number: no count read
            if func in self.SELECTIONS and not masked_fill and (func is torch.ops.aten.nonzero.default
                                                                or any(t.dtype == torch.bool for t in tensors[1:])):
                self.reads.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.assume = torch.fx.experimental._config.meta_nonzero_assume_all_nonzero
        torch.fx.experimental._config.meta_nonzero_assume_all_nonzero = True
        self.copies = HostCopies(self.reads).__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        torch.fx.experimental._config.meta_nonzero_assume_all_nonzero = self.assume
        self.copies.__exit__(*exc)
        return super().__exit__(*exc)


class HostCopies(TorchFunctionMode):
    """Records each tensor made on the meta device from host data (a host-to-device copy, a sync on a GPU): made by
    ``torch.tensor``, ``as_tensor`` or ``new_tensor`` from Python numbers, or a list index of a meta tensor."""

    def __init__(self, reads: list):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        device = kwargs.get("device")
        if name in ("tensor", "as_tensor") and not isinstance(args[0], torch.Tensor) and str(device) == "meta":
            self.reads.append(f"{name} from host data")
        elif name == "new_tensor" and args[0].is_meta and not isinstance(args[1], torch.Tensor):
            self.reads.append("new_tensor from host data")
        elif name in ("__getitem__", "__setitem__") and args[0].is_meta and any(
                isinstance(i, list) for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.reads.append(f"{name} with a list index")
        return func(*args, **kwargs)


class BackboneReached(Exception):
    pass


def reads_before_the_backbone(model) -> list[str]:
    def stop(*args, **kwargs):
        raise BackboneReached
    model.backbone.forward = stop
    images, targets = batch()
    images = [im.to("meta") for im in images]
    targets = [{k: v.to("meta") for k, v in t.items()} for t in targets]
    with ReadBacks() as mode, pytest.raises(BackboneReached):
        model(images, targets)
    return mode.reads


@pytest.mark.parametrize("name", ["fasterrcnn", "maskrcnn", "retinanet", "fcos"])
def test_nothing_is_read_back_from_the_device_before_the_backbone(name):
    reads = reads_before_the_backbone(model_of(name))  # torchvision's: per image the constants, the box scales,
    assert len(reads) == 7 * len(SIZES), reads  # a read of its box check
    model = model_of(name)
    sync_free_inputs(model)
    assert reads_before_the_backbone(model) == ["as_tensor from host data"] * 2  # the mean and std, once
    assert reads_before_the_backbone(model) == []


def test_evaluation_gives_torchvisions_detections():
    model = model_of("fasterrcnn").eval()
    images, _ = batch()
    with torch.no_grad():
        want = model(images)
        sync_free_inputs(model)
        got = model(images)
    assert all(torch.equal(w[k], g[k]) for w, g in zip(want, got) for k in w)


def test_the_training_loop_checks_the_boxes_on_the_host_with_a_one_line_error():
    _, targets = batch()
    engine.check_boxes(targets)  # fine
    targets[1]["image_id"] = 17
    targets[1]["boxes"][1, 2] = targets[1]["boxes"][1, 0]  # zero width
    with pytest.raises(DetpipeError, match=r"^image 17: box \[.*\] \(x1, y1, x2, y2\) has no positive width"):
        engine.check_boxes(targets)
    del targets[1]["image_id"]
    with pytest.raises(DetpipeError, match="^target 1 of the batch: box"):
        engine.check_boxes(targets)


def test_a_degenerate_box_stops_training_before_any_step():
    model = model_of("fcos")
    sync_free_inputs(model)
    images, targets = batch()
    targets[0]["boxes"][0, 3] = targets[0]["boxes"][0, 1] - 1  # negative height
    targets[0]["image_id"] = 5
    loader = torch.utils.data.DataLoader(list(zip(images, targets)), batch_size=len(images), collate_fn=collate)
    before = [p.clone() for p in model.parameters()]
    optimizer = engine.build_optimizer(model, lr=0.01)
    scheduler = engine.build_scheduler(optimizer, 1, 0, "constant")
    with pytest.raises(DetpipeError, match="^image 5: box"):
        engine.train_one_epoch(model, optimizer, scheduler, loader, torch.device("cpu"), 1, log=lambda msg: None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_other_models_are_left_alone_and_applying_twice_is_harmless():
    assert not sync_free_inputs(torch.nn.Linear(2, 2))
    model = model_of("fcos")
    assert sync_free_inputs(model)
    classes = type(model), type(model.transform)
    assert sync_free_inputs(model) and (type(model), type(model.transform)) == classes


def test_a_subclass_with_its_own_forward_keeps_it_with_a_warning():
    from torchvision.models.detection.fcos import FCOS

    class OwnForward(FCOS):
        def forward(self, images, targets=None):
            return super().forward(images, targets)

    model = model_of("fcos")
    model.__class__ = OwnForward
    with pytest.warns(UserWarning, match="OwnForward has its own forward: left as it is"):
        assert sync_free_inputs(model)  # the transform is still swapped
    assert type(model) is OwnForward and isinstance(model.transform, SyncFreeTransform)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning",
                            "ignore:.* always returns a .Losses, Detections. tuple in scripting:UserWarning")
@pytest.mark.parametrize("name", ["fcos", "retinanet", "fasterrcnn"])
def test_a_swapped_model_pickles_and_scripts_as_torchvisions(name):
    import pickle

    from detpipe.rpn import ParallelRPN, parallel_rpn

    model = model_of(name)
    sync_free_inputs(model)
    sync_free_loss(model)
    rcnn = name == "fasterrcnn"
    assert parallel_rpn(model) == rcnn  # the train stage's levers all at once
    want_losses, _ = step(model)
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is type(model) and type(copy.transform) is SyncFreeTransform
    assert isinstance(getattr(copy, "rpn", None), ParallelRPN) == rcnn
    got_losses, _ = step(copy)
    assert all(torch.equal(want_losses[k], got_losses[k]) for k in want_losses)
    plain = model_of(name)
    plain.load_state_dict(model.state_dict())
    images, _ = batch()
    with torch.no_grad():  # a scripted detector returns (losses, detections)
        want, got = (torch.jit.script(m.eval())(images)[1] for m in (plain, model))
    # scripting used copies with torchvision's classes: the model keeps its levers
    assert type(model).__module__ == "detpipe.syncfree" and type(model.transform) is SyncFreeTransform
    assert isinstance(getattr(model, "rpn", None), ParallelRPN) == rcnn
    assert all(torch.equal(w[k], g[k]) for w, g in zip(want, got) for k in w)


def test_a_mask_rcnn_gets_the_named_class():
    """(detpipe's Mask R-CNN has its own RoI heads, a class made in a function: it pickles with cloudpickle, as
    MLflow logs it, not with pickle)"""
    from detpipe.syncfree import SyncFreeMaskRCNN

    model = model_of("maskrcnn")
    assert sync_free_inputs(model) and type(model) is SyncFreeMaskRCNN


def test_the_defaults_have_the_inputs_lever_on_and_the_loss_lever_off():
    """(test_engine's test_the_train_stage_passes_the_levers_on checks that the train stage applies them)"""
    train = config.load(ROOT / "params" / "detpipe.yaml").train
    assert train.sync_free_inputs is True and train.sync_free_loss is False


def test_the_default_model_trains_the_same_bit_for_bit():
    def default_step(lever: bool):
        torch.manual_seed(0)
        model = build_from_params(config.load(ROOT / "params" / "detpipe.yaml").model, 4).train()
        if lever:
            assert sync_free_inputs(model)
        return step(model)

    want_losses, want_grads = default_step(False)
    got_losses, got_grads = default_step(True)
    assert all(torch.equal(want_losses[k], got_losses[k]) for k in want_losses)
    assert want_grads.keys() == got_grads.keys() and all(torch.equal(want_grads[k], got_grads[k]) for k in want_grads)


def fcos_step(loss: bool, empty_image: bool = True, inputs: bool = True):
    model = model_of("fcos")
    if inputs:
        sync_free_inputs(model)
    if loss:
        assert sync_free_loss(model)
    images, targets = batch()
    if empty_image:  # an image without objects: every anchor is background
        targets[1] = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    losses = model(images, targets)
    sum(losses.values()).backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("empty_image, inputs", [(False, True), (True, True), (True, False)])
def test_the_fcos_loss_without_syncs_is_torchvisions_up_to_float_rounding(empty_image, inputs):
    want_losses, want_grads = fcos_step(False, empty_image, inputs)
    got_losses, got_grads = fcos_step(True, empty_image, inputs)
    assert list(want_losses) == list(got_losses) == ["classification", "bbox_regression", "bbox_ctrness"]
    assert torch.equal(want_losses["classification"], got_losses["classification"])  # the same sum, bit for bit
    assert all(float(want_losses[k].detach()) > 0 for k in want_losses)
    for k in want_losses:
        torch.testing.assert_close(got_losses[k], want_losses[k], rtol=1e-5, atol=0)
    assert want_grads.keys() == got_grads.keys()
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-6)


def test_an_fcos_training_step_with_both_reads_nothing_back_from_the_device():
    def reads(loss: bool) -> list[str]:
        model = model_of("fcos")
        sync_free_inputs(model)
        if loss:
            sync_free_loss(model)
        model.to("meta")
        images, targets = batch()
        images = [im.to("meta") for im in images]
        targets = [{k: v.to("meta") for k, v in t.items()} for t in targets]
        with ReadBacks():  # a first step: the transform's constants are made on the device once
            sum(model(images, targets).values()).backward()
        with ReadBacks() as mode:
            sum(model(images, targets).values()).backward()
        return mode.reads

    assert len(reads(False)) >= 4  # torchvision's FCOS loss: a count and the foreground selections
    assert reads(True) == []


def test_the_fcos_loss_applies_to_fcos_only():
    assert not sync_free_loss(model_of("retinanet")) and not sync_free_loss(model_of("fasterrcnn"))
    model = model_of("fcos")
    assert sync_free_loss(model) and sync_free_loss(model) and isinstance(model.head, SyncFreeFCOSHead)


def test_the_giou_loss_without_masks_is_torchvisions_bit_for_bit():
    from torchvision.ops import generalized_box_iou_loss

    from detpipe.syncfree import _giou_loss

    g = torch.Generator().manual_seed(3)
    xy = torch.rand(2, 500, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(2, 500, 2, generator=g) * 30], 2)  # many pairs apart, many overlapping
    boxes[0, :5] = boxes[1, :5]  # identical pairs
    a, b = (boxes[0].clone().requires_grad_(), boxes[1].clone().requires_grad_())
    want = generalized_box_iou_loss(a, b, reduction="none")
    want_grads = torch.autograd.grad(want.sum(), (a, b))
    got = _giou_loss(a, b)
    assert torch.equal(want, got) and ((want > 1) & (want < 2)).any() and (want < 1).any()
    assert all(torch.equal(w, g) for w, g in zip(want_grads, torch.autograd.grad(got.sum(), (a, b))))


def test_an_overflowing_background_prediction_gives_no_nan_gradient(monkeypatch):
    """fp16 can decode a background anchor's box to inf: torchvision selects it out, masking must not let a NaN in."""
    from torchvision.models.detection.fcos import FCOSHead

    seen, real = {}, FCOSHead.compute_loss
    monkeypatch.setattr(FCOSHead, "compute_loss",
                        lambda self, *args: seen.setdefault("args", args) and real(self, *args))
    model = model_of("fcos")
    model(*batch())
    targets, outputs, anchors, matched = seen["args"]
    regression = outputs["bbox_regression"].detach().clone()
    regression[0, torch.where(matched[0] < 0)[0][0]] = float("inf")
    regression.requires_grad_()
    outputs = {**{k: v.detach() for k, v in outputs.items()}, "bbox_regression": regression}
    for head in (FCOSHead, SyncFreeFCOSHead):
        losses = real(model.head, targets, outputs, anchors, matched) if head is FCOSHead else \
            SyncFreeFCOSHead.compute_loss(model.head, targets, outputs, anchors, matched)
        grad, = torch.autograd.grad(sum(losses.values()), regression)
        assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(grad).all(), head.__name__


def test_a_batch_without_any_object_gives_torchvisions_fcos_losses():
    def losses(loss: bool):
        model = model_of("fcos")
        sync_free_inputs(model)
        if loss:
            sync_free_loss(model)
        images, _ = batch()
        return model(images, [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
                              for _ in images])

    want, got = losses(False), losses(True)
    assert want["classification"].item() > 0 and all(want[k].item() == 0 for k in ("bbox_regression", "bbox_ctrness"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
