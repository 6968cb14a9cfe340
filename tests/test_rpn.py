"""train.parallel_rpn (detpipe.rpn): each image's RPN proposals filtered in a thread of its own, the same proposals.

On the CPU the threaded path is forced with ``ParallelRPN.parallel_on_cpu``; the CUDA streams it adds on a GPU are
checked there by ``python -m benchmarks.gpu_train_bench --check-rpn``.
"""

import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork

from detpipe import config
from detpipe.models import build_model
from detpipe.rpn import ParallelRPN, parallel_rpn
from tests.conftest import ROOT


@pytest.fixture
def threaded_on_cpu(monkeypatch):
    monkeypatch.setattr(ParallelRPN, "parallel_on_cpu", True)


def rpn_inputs(images: int, seed: int):
    """Dense, overlapping proposals over three levels, some of them tiny or partly outside the image."""
    g = torch.Generator().manual_seed(seed)
    per_level = [3000, 800, 200]
    count = sum(per_level)
    xy = torch.rand(images, count, 2, generator=g) * 300 - 20
    wh = torch.rand(images, count, 2, generator=g) * 80 + torch.where(torch.rand(images, count, 1, generator=g) < 0.05,
                                                                         -79.9, 0.0)
    proposals = torch.cat([xy, xy + wh], dim=2)
    objectness = torch.randn(images, count, generator=g)
    objectness[:, :50] = objectness[:, 50:100]  # ties in score
    shapes = [(256 - 16 * i, 300) for i in range(images)]
    return proposals, objectness, shapes, per_level


@pytest.mark.parametrize("seed", [0, 1])
def test_threaded_filtering_keeps_torchvisions_proposals_bit_for_bit(threaded_on_cpu, seed):
    model = build_model("fasterrcnn", "resnet10", 3, min_size=128, max_size=160, fpn_channels=32).train()
    rpn = model.rpn
    rpn._pre_nms_top_n["training"], rpn._post_nms_top_n["training"] = 1000, 300  # some levels cut, some not
    inputs = rpn_inputs(4, seed)
    want_boxes, want_scores = RegionProposalNetwork.filter_proposals(rpn, *inputs)
    assert parallel_rpn(model) and isinstance(rpn, ParallelRPN)
    got_boxes, got_scores = rpn.filter_proposals(*inputs)
    assert len(got_boxes) == 4
    for want, got in zip(want_boxes + want_scores, got_boxes + got_scores):
        assert want.shape[0] > 0 and torch.equal(want, got)


def test_a_training_step_gives_the_same_losses_and_gradients(threaded_on_cpu):
    def step(parallel: bool):
        torch.manual_seed(0)
        model = build_model("maskrcnn", "resnet10", 3, min_size=96, max_size=128, fpn_channels=32).train()
        if parallel:
            parallel_rpn(model)
        assert isinstance(model.rpn, ParallelRPN) == parallel
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, 96, 128, generator=g) for _ in range(3)]
        targets = []
        for _ in images:
            boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]])
            masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
            masks[0, 12:70, 10:60] = masks[1, 20:90, 50:120] = 1
            targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
        torch.manual_seed(2)  # the samplers' draws
        losses = model(images, targets)
        sum(losses.values()).backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_losses, want_grads = step(False)
    got_losses, got_grads = step(True)
    assert want_losses.keys() == got_losses.keys()
    assert all(torch.equal(want_losses[k], got_losses[k]) for k in want_losses)
    assert want_grads.keys() == got_grads.keys()
    assert all(torch.equal(want_grads[k], got_grads[k]) for k in want_grads)


def test_an_error_in_one_image_is_raised_after_every_thread_is_done(threaded_on_cpu, monkeypatch):
    model = build_model("fasterrcnn", "resnet10", 3, min_size=128, max_size=160, fpn_channels=32).train()
    parallel_rpn(model)
    real, finished = ParallelRPN._filter_image, []

    def filter_image(self, boxes, *args):
        if boxes.shape[0] and float(boxes[0, 0]) == float(failing[0, 0]):
            raise RuntimeError("out of memory in image 1")
        out = real(self, boxes, *args)
        finished.append(len(out[0]))
        return out

    monkeypatch.setattr(ParallelRPN, "_filter_image", filter_image)
    proposals, objectness, shapes, levels = rpn_inputs(4, 0)
    failing = proposals[1].clone()
    objectness[1] = 100.0 - torch.arange(objectness.shape[1]) * 1e-3  # image 1's best box is its first
    with pytest.raises(RuntimeError, match="out of memory in image 1"):
        model.rpn.filter_proposals(proposals, objectness, shapes, levels)
    assert len(finished) == 3  # the other three images were not cut short


def test_evaluation_and_the_cpu_keep_torchvisions_loop(monkeypatch):
    model = build_model("fasterrcnn", "resnet10", 3, min_size=128, max_size=160, fpn_channels=32)
    parallel_rpn(model)
    calls = []
    monkeypatch.setattr("detpipe.rpn._workers", lambda *a: calls.append(a))  # the threads are never asked for
    inputs = rpn_inputs(2, 0)
    for mode in (True, False):  # training on the CPU (parallel_on_cpu off), then evaluation
        model.rpn.train(mode)
        got = model.rpn.filter_proposals(*inputs)
        want = RegionProposalNetwork.filter_proposals(model.rpn, *inputs)
        assert all(torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1]))
    assert calls == []


def test_models_without_an_rpn_are_left_alone_and_applying_twice_is_harmless():
    fcos = build_model("fcos", "resnet10", 3, min_size=128, max_size=160, fpn_channels=64)
    assert not parallel_rpn(fcos)
    model = build_model("fasterrcnn", "resnet10", 3, min_size=128, max_size=160, fpn_channels=32)
    assert parallel_rpn(model) and parallel_rpn(model)
    assert type(model.rpn).__mro__.count(ParallelRPN) == 1


def test_a_subclass_with_its_own_filtering_keeps_it_with_a_warning_and_one_without_gets_the_threads():
    class OwnFiltering(RegionProposalNetwork):
        def filter_proposals(self, *args):
            return super().filter_proposals(*args)

    class Plain(RegionProposalNetwork):
        pass

    model = build_model("fasterrcnn", "resnet10", 3, min_size=128, max_size=160, fpn_channels=32)
    model.rpn.__class__ = OwnFiltering
    with pytest.warns(UserWarning, match="OwnFiltering has its own filter_proposals: left as it is"):
        assert not parallel_rpn(model)
    assert type(model.rpn) is OwnFiltering
    model.rpn.__class__ = Plain
    assert parallel_rpn(model)
    made = type(model.rpn)
    assert made.__name__ == "ParallelPlain" and isinstance(model.rpn, ParallelRPN) and isinstance(model.rpn, Plain)
    assert type(model.rpn.__prepare_scriptable__()) is Plain  # scripted as the class it had
    other = build_model("fasterrcnn", "resnet10", 3, min_size=128, max_size=160, fpn_channels=32)
    other.rpn.__class__ = Plain
    assert parallel_rpn(other) and type(other.rpn) is made  # one class per subclass


def test_the_param_is_on_in_the_project_params_and_off_in_the_schema():
    """(test_engine's test_the_train_stage_passes_the_levers_on checks that the train stage applies it)"""
    assert config.load(ROOT / "params" / "detpipe.yaml").train.parallel_rpn is True
    assert config.SCHEMA["train"]["parallel_rpn"].default is False
