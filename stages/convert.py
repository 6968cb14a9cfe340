"""Stage 2: raw dataset -> COCO JSON per split, mmdetection's middle format, and a stats file.

With params: python stages/convert.py --src data/raw --formats workflow/formats --out data/coco
Standalone:  python stages/convert.py --format {coco,kitti,via,voc,yolo,...} --src DIR --out DIR
             [--classes a,b] [--val-fraction F --seed N]
"""

from pathlib import Path

from detpipe import cli, config, convert, formats


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--src", default="data/raw", help="raw dataset folder (default: %(default)s)")
    p.add_argument("--out", default="data/coco", help="output folder (default: %(default)s)")
    p.add_argument("--formats", default=str(formats.PLUGIN_DIR),
                   help="folder of the project's own format loaders (default: %(default)s)")
    p.add_argument("--format", help="standalone: raw format (skips params)")
    p.add_argument("--classes", help="standalone: comma-separated class names (default: every class found)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="standalone: share of images for val when the data has no split files (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="standalone: seed of that split (default: %(default)s)")
    p.add_argument("--min-box-size", type=float, default=1.0, help="standalone: see convert.min_box_size")
    p.add_argument("--strict", action="store_true", help="standalone: clipped or dropped boxes are errors")
    args = p.parse_args()
    if args.format:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        convert.run(Path(args.src), Path(args.out), fmt=args.format, classes=classes, val_fraction=args.val_fraction,
                    seed=args.seed, min_box_size=args.min_box_size, strict=args.strict, plugins=Path(args.formats))
        return
    cfg = config.load(args.params, args.overrides)
    d = cfg.data
    convert.run(Path(args.src), Path(args.out), fmt=d.format, classes=d.classes, splits=d.splits, options=d.options,
                val_fraction=d.val_fraction, seed=d.split_seed, min_box_size=cfg.convert.min_box_size,
                strict=cfg.convert.strict, plugins=Path(args.formats),
                where=f"{config.DATASETS_FILE}: {cfg.dataset}")


if __name__ == "__main__":
    cli.main(main)
