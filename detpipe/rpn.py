"""The RPN's proposal filtering with each image's NMS on its own CUDA stream (``train.parallel_rpn``).

torchvision's RegionProposalNetwork filters the proposals of a batch one image after the other: clip, drop small
and low-scoring boxes, NMS, keep the best. Each of those steps waits for the GPU (their output sizes depend on
the data), and NMS ends in a one-thread-block kernel that walks the boxes in order: on an H100 with 800x1333
batches of 8 that is 3 ms per image, 22 % of Faster R-CNN's GPU time, the images strictly in turn
(docs/performance.md). Here each image's steps run in a thread of its own, on a CUDA stream of its own, so the
images' kernels and waits overlap. The steps and their inputs are torchvision's, so the proposals are the same,
bit for bit (tests/test_rpn.py; on a GPU, ``benchmarks.gpu_train_bench --check-rpn``).

Only in training, only on CUDA: elsewhere torchvision's own loop runs. Applied by :func:`parallel_rpn` in the
train stage (``train.parallel_rpn``); checkpoints and logged models keep torchvision's class, and
``torch.jit.script`` scripts the RPN as torchvision's. Images beyond
:data:`MAX_THREADS` in one batch share the streams (and the threads) in turn.
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

from detpipe.swap import Lever, swap

MAX_THREADS = 32  # threads of the pool (started as needed); a larger batch's images share them


def parallel_rpn(model) -> bool:
    """Filter the proposals of ``model``'s RPN image by image in parallel (in place); False if it has no RPN, or its
    RPN has its own ``filter_proposals`` (kept, with a warning). The RPN's class is swapped (detpipe.swap):
    torchvision's own RegionProposalNetwork becomes :class:`ParallelRPN` (picklable by name)."""
    rpn = getattr(model, "rpn", None)
    return isinstance(rpn, RegionProposalNetwork) and swap(rpn, ParallelRPN)


class _Workers:
    """A thread pool and CUDA streams for one device, kept for the process; streams are added as batches grow."""

    def __init__(self, device: torch.device):
        self.device, self.streams = device, []
        init = (torch.cuda.set_device, (device,)) if device.type == "cuda" else (None, ())
        self.pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="detpipe-rpn", initializer=init[0],
                                       initargs=init[1])  # on the device's GPU, not GPU 0 (a DDP rank)

    def streams_for(self, count: int) -> list:  # called from the training thread only
        if self.device.type != "cuda":
            return [None] * count
        while len(self.streams) < min(count, MAX_THREADS):
            self.streams.append(torch.cuda.Stream(self.device))
        return [self.streams[i % len(self.streams)] for i in range(count)]


@functools.cache
def _workers(device: torch.device) -> _Workers:
    return _Workers(device)


class ParallelRPN(Lever, RegionProposalNetwork):
    """torchvision's RegionProposalNetwork whose training-time :meth:`filter_proposals` runs per image in threads."""

    TORCHVISION, REPLACES, PREFIX = RegionProposalNetwork, ("filter_proposals",), "Parallel"
    KEPT = "its proposals filtered one image after the other"

    parallel_on_cpu = False  # tests set it to run the threaded path on a CPU

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        device = proposals.device
        if not self.training or (device.type != "cuda" and not self.parallel_on_cpu):
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device)
                            for i, n in enumerate(num_anchors_per_level)]).reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # as torchvision: the best per level
        rows = torch.arange(num_images, device=device)[:, None]
        objectness, levels, proposals = objectness[rows, top_n_idx], levels[rows, top_n_idx], proposals[rows, top_n_idx]
        scores = torch.sigmoid(objectness)

        workers = _workers(device)
        streams = workers.streams_for(num_images)
        main = torch.cuda.current_stream(device) if device.type == "cuda" else None
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        grad = torch.is_grad_enabled()  # thread-local, as autocast and the current stream

        def one(i):
            stream = streams[i]
            with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()), \
                    torch.autocast(device.type, dtype=autocast[1], enabled=autocast[0]), torch.set_grad_enabled(grad):
                boxes, kept = self._filter_image(proposals[i], scores[i], levels[i], image_shapes[i])
                if stream is not None:  # made on this stream, used on the main one: not reused before it is done
                    boxes.record_stream(main)
                    kept.record_stream(main)
                return boxes, kept

        if main is not None:
            for stream in set(streams):
                stream.wait_stream(main)
        futures = [workers.pool.submit(one, i) for i in range(num_images)]
        try:
            wait(futures)  # every thread done queuing its work, also when one of them failed
        finally:
            if main is not None:  # the main stream's later work (freeing the inputs too) waits for theirs
                for stream in set(streams):
                    main.wait_stream(stream)
        results = [f.result() for f in futures]  # the first thread's error, if any, raised here
        return [boxes for boxes, _ in results], [kept for _, kept in results]

    def _filter_image(self, boxes, scores, levels, image_shape):
        """One image's filtering, torchvision's steps: clip, drop small and low-scoring boxes, NMS per level, best."""
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        keep = box_ops.remove_small_boxes(boxes, self.min_size)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = torch.where(scores >= self.score_thresh)[0]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = box_ops.batched_nms(boxes, scores, levels, self.nms_thresh)[: self.post_nms_top_n()]
        return boxes[keep], scores[keep]
