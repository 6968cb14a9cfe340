"""Pictures: boxes, labels and masks drawn on images (the report and ``show_result``), and the report's charts
(training curves, box sizes, precision-recall curves, confusion matrix) as PNG bytes."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]
MARK = (255, 0, 0)  # boxes the analysis points at: a missed object, a false positive
COCO_SIZES = (32, 96)  # COCO's small / medium / large boundaries, in sqrt(box area) pixels


def draw(image: Image.Image, boxes, labels, class_names, scores=None, masks=None, scale: float = 1,
         marks=None) -> Image.Image:
    """Return a copy of ``image`` (resized by ``scale``) with boxes [x1, y1, x2, y2], names and masks drawn.

    ``labels`` index ``class_names``; ``masks`` are HxW arrays at the image's own size (None: no mask for that
    box). ``marks``: per box a word (``"missed"``, ``"FP"``) or None; a marked box is drawn thick, in red, the
    word before its label.
    """
    img = image.convert("RGB")
    if masks is not None and len(masks):
        arr = np.asarray(img).astype(np.float32)
        for mask, label in zip(masks, labels):
            if mask is None:
                continue
            colour = np.array(PALETTE[label % len(PALETTE)], dtype=np.float32)
            m = np.asarray(mask).astype(bool)
            arr[m] = arr[m] * 0.5 + colour * 0.5
        img = Image.fromarray(arr.astype(np.uint8))
    if scale != 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)
    canvas = ImageDraw.Draw(img)
    marks = marks if marks is not None else [None] * len(labels)
    order = sorted(range(len(labels)), key=lambda i: marks[i] is not None)  # marked boxes on top
    for i in order:
        box, label, mark = boxes[i], labels[i], marks[i]
        colour = MARK if mark else PALETTE[label % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        canvas.rectangle([x1, y1, x2, y2], outline=colour, width=3 if mark else 2)
        text = (f"{mark} " if mark else "") + class_names[label] + (
            f" {scores[i]:.2f}" if scores is not None and scores[i] is not None else "")
        tw = canvas.textlength(text)
        canvas.rectangle([x1, max(0, y1 - 11), x1 + tw + 4, max(11, y1)], fill=colour)
        canvas.text((x1 + 2, max(0, y1 - 11)), text, fill=(255, 255, 255) if mark else (0, 0, 0))
    return img


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    pair = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    pair.paste(left, (0, 0))
    pair.paste(right, (left.width + gap, 0))
    return pair


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    """An image file's bytes: JPEG (photos with boxes: a tenth of the PNG's size) or PNG."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def data_uri(image: Image.Image | bytes, mime: str = "image/png") -> str:
    """A ``data:`` URI of an image (PNG) or of an image file's bytes of type ``mime``."""
    data = image if isinstance(image, bytes) else encode(image, "PNG")
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _pyplot():
    import matplotlib  # heavy: only when a chart is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _number(value) -> float | None:
    return None if value in ("", None) else float(value)


def training_chart(iterations: list[dict], epochs: list[dict]) -> bytes:
    """Three panels: losses per iteration, learning rate per iteration, validation mAP per epoch.

    ``iterations``: ``iter_log.csv`` rows (``epoch, iter, lr, loss`` and any ``loss_*`` columns); ``epochs``:
    ``train_log.csv`` rows, whose per-epoch mean loss components (``train/loss_*``) are drawn at each epoch's last
    iteration, as steps, when the iteration log has the total only.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_lr, ax_map) = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.array([int(r["iter"]) for r in iterations])
    loss = np.array([float(r["loss"]) for r in iterations])
    ax_loss.plot(x, loss, lw=0.6, alpha=0.4, color="black")
    if len(loss) >= 10:
        k = max(2, len(loss) // 25)
        ax_loss.plot(x[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color="black",
                     label=f"loss (mean of {k})")
    else:
        ax_loss.plot(x, loss, color="black", marker=".", label="loss")
    components = [c for c in iterations[0] if c.startswith("loss_")]
    for c in components:
        ax_loss.plot(x, [float(r[c]) for r in iterations], lw=0.8, label=c.removeprefix("loss_"))
    if not components:
        last_iter = {}
        for r in iterations:
            last_iter[int(r["epoch"])] = int(r["iter"])
        for key in [k for k in epochs[0] if k.startswith("train/loss_")]:
            points = [(last_iter[int(r["epoch"])], float(r[key])) for r in epochs
                      if int(r["epoch"]) in last_iter and r.get(key) not in ("", None)]
            if points:
                ax_loss.step(*zip(*points), where="pre", marker="o", ms=3, lw=1,
                             label=f"{key.removeprefix('train/loss_')} (epoch mean)")
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss")
    ax_loss.legend(fontsize=7)
    ax_lr.plot(x, [float(r["lr"]) for r in iterations], color="tab:blue")
    ax_lr.set(xlabel="iteration", ylabel="learning rate", title="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    curves = [k for k in epochs[0] if k.startswith("val/") and k.endswith(("_mAP", "_mAP_50"))]
    for key in curves:
        points = [(int(r["epoch"]), _number(r.get(key))) for r in epochs]
        points = [(e, v) for e, v in points if v is not None]  # epochs that were not validated have empty cells
        if points:
            ax_map.plot(*zip(*points), marker="o", label=key.removeprefix("val/"))
    ax_map.set(xlabel="epoch", ylabel="mAP", title="validation mAP per epoch", ylim=(0, 1))
    ax_map.xaxis.get_major_locator().set_params(integer=True)
    if curves:
        ax_map.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def box_size_chart(sizes: dict[str, list[float]]) -> bytes:
    """Histogram of the objects' sizes (sqrt of the box area, log bins) per split, with COCO's size limits."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    values = [v for vs in sizes.values() for v in vs if v > 0]
    lo, hi = (min(values), max(values)) if values else (1.0, 100.0)
    bins = np.geomspace(max(lo, 1.0) / 1.1, max(hi, 2.0) * 1.1, 30)
    for split, vs in sizes.items():
        ax.hist([v for v in vs if v > 0], bins=bins, histtype="step", lw=1.5, label=f"{split} ({len(vs)})")
    for limit, name in zip(COCO_SIZES, ("small | medium", "medium | large")):
        ax.axvline(limit, color="grey", ls="--", lw=0.8)
        ax.text(limit, 1, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="grey")
    ax.set_xscale("log")
    ax.set(xlabel="box size: sqrt(width x height), pixels", ylabel="objects", title="object sizes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def pr_chart(curves: list[dict], ap: dict[str, float | None]) -> bytes:
    """Precision-recall curves, one per class (``pr_curves.csv`` rows), with each class's AP in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    by_class: dict[str, list] = {}
    for r in curves:
        by_class.setdefault(r["class"], []).append((float(r["recall"]), float(r["precision"])))
    colours = plt.get_cmap("tab20" if len(by_class) > 10 else "tab10")
    for i, (name, points) in enumerate(by_class.items()):
        value = ap.get(name)
        ax.plot(*zip(*points), lw=1.3, color=colours(i % colours.N),
                label=f"{name} (AP {value:.2f})" if value is not None else name)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title="precision-recall per class (IoU 0.5)")
    if by_class:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(by_class) // 20)
    fig.tight_layout()
    return _png(fig)


def confusion_chart(labels: list[str], matrix: list[list[int]]) -> bytes:
    """The confusion matrix (rows: actual class, columns: predicted), coloured by each row's share, with counts."""
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.int64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(9.0, 2.5 + 0.45 * len(labels))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    if len(labels) <= 25:
        for (i, j), c in np.ndenumerate(counts):
            if c:
                ax.text(j, i, str(c), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="actual", title="confusion matrix (share of each actual class)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _png(fig)
