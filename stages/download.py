"""Stage 1: put the selected dataset's raw files, as published, into the output folder.

With params: python stages/download.py --out data/raw
Standalone:  python stages/download.py --url URL --sha256 HEX --out DIR [--subdir NAME]
"""

import os
from pathlib import Path

from detpipe import cli, config, download
from detpipe.errors import DetpipeError


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", default="data/raw", help="output folder (default: %(default)s)")
    p.add_argument("--url", help="standalone: archive URL or path (skips params)")
    p.add_argument("--sha256", help="standalone: expected sha256 of the archive")
    p.add_argument("--subdir", default="", help="standalone: folder inside the archive holding the dataset")
    p.add_argument("--cache", default=os.environ.get("DETPIPE_CACHE", str(Path.home() / ".cache/detpipe")),
                   help="standalone: where verified archives are kept (default: %(default)s)")
    args = p.parse_args()
    if args.url:
        if not args.sha256:
            raise DetpipeError("--sha256 is required with --url (the archive is verified before unpacking)")
        entry = {"source": "url", "archives": [{"url": args.url, "sha256": args.sha256, "subdir": args.subdir}]}
        download.run(entry, Path(args.out), cache=Path(args.cache), max_unpacked_gb=64,
                     max_ratio=config.SCHEMA["download"]["max_ratio"].default, retries=4, where="--url")
        return
    cfg = config.load(args.params, args.overrides)
    dl = cfg.download
    download.run(config.dict_of(cfg.data), Path(args.out), cache=Path(dl.cache), max_unpacked_gb=dl.max_unpacked_gb,
                 max_ratio=dl.max_ratio, retries=dl.retries, where=f"{config.DATASETS_FILE}: {cfg.dataset}")


if __name__ == "__main__":
    cli.main(main)
