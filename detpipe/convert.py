"""The convert stage: a raw dataset folder -> COCO JSON and middle format per split, plus ``stats.json``.

The format's loader comes from :mod:`detpipe.formats` (built in, or the project's own in ``plugins``);
the checks, clipping and output are :mod:`detpipe.conversion`'s.
"""

from __future__ import annotations

from pathlib import Path

from detpipe import formats
from detpipe.conversion import convert_dataset
from detpipe.errors import DetpipeError
from detpipe.files import content_hash


def run(src: Path, out: Path, *, fmt: str, classes: list[str] | None, splits: dict | None = None,
        options: dict | None = None, val_fraction: float = 0.2, seed: int = 0, min_box_size: float = 1.0,
        strict: bool = False, plugins: Path = formats.PLUGIN_DIR, where: str = "--format") -> dict:
    """Convert ``src`` (format ``fmt``) into ``out``; returns the stats. ``where`` names the format's origin."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DetpipeError(f"{src}: raw dataset folder does not exist; run the download stage first")
    try:
        formats.loader(fmt, Path(plugins))
    except DetpipeError as exc:  # unknown format (with a suggestion) or a broken plugin
        raise DetpipeError(f"{where}: {exc}") from None
    stats = convert_dataset(fmt, src, out, classes or None, splits=splits, options=options,
                            val_fraction=val_fraction, seed=seed, min_box_size=min_box_size, strict=strict,
                            content_hash=content_hash(src), progress=True, plugins=Path(plugins))
    for split, s in stats["splits"].items():
        changed = ", ".join(f"{k} {v}" for k, v in s["boxes_changed"].items() if v) or "none"
        print(f"{split}: {s['images']} images, {s['objects']} objects, {s['ignored']} ignore regions; {changed}")
    return stats
