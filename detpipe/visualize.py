"""Drawing boxes, labels and masks on images; shared by the report and ``show_result``."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def draw(image: Image.Image, boxes, labels, class_names, scores=None, masks=None, scale: int = 1) -> Image.Image:
    """Return a copy of ``image`` (upscaled by ``scale``) with boxes [x1, y1, x2, y2], names and masks drawn.

    ``labels`` index ``class_names``; ``masks`` are HxW arrays at the image's own size.
    """
    img = image.convert("RGB")
    if masks is not None and len(masks):
        arr = np.asarray(img).astype(np.float32)
        for mask, label in zip(masks, labels):
            colour = np.array(PALETTE[label % len(PALETTE)], dtype=np.float32)
            m = np.asarray(mask).astype(bool)
            arr[m] = arr[m] * 0.5 + colour * 0.5
        img = Image.fromarray(arr.astype(np.uint8))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    canvas = ImageDraw.Draw(img)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        colour = PALETTE[label % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        canvas.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = class_names[label] + (f" {scores[i]:.2f}" if scores is not None else "")
        tw = canvas.textlength(text)
        canvas.rectangle([x1, max(0, y1 - 11), x1 + tw + 4, max(11, y1)], fill=colour)
        canvas.text((x1 + 2, max(0, y1 - 11)), text, fill=(0, 0, 0))
    return img


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
