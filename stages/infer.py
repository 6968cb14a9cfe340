"""Detect objects in an image, a folder of images, a video or a camera with a trained checkpoint (not a pipeline
stage): writes annotated images or video and detections.json into --out, and prints frames per second.

python stages/infer.py --checkpoint runs/train/model.pt --input data/raw/val --out runs/infer
python stages/infer.py --checkpoint runs/train/model.pt --input clip.mp4 --out runs/infer-clip
python stages/infer.py --checkpoint runs/train/model.pt --input 0 --out runs/webcam --max-frames 300
"""

from detpipe import cli, infer


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="train stage checkpoint, e.g. runs/train/model.pt")
    p.add_argument("--input", required=True,
                   help="an image, a folder of images, a video file, or a camera index (0 is the first webcam)")
    p.add_argument("--out", required=True, help="output folder, written whole (replaced when it holds an "
                                                "earlier infer output)")
    p.add_argument("--score-thr", type=float, default=0.3,
                   help="detections below this score are neither drawn nor saved (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto uses CUDA when present (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="images or frames per forward pass (default: %(default)s)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="stop a video or camera after this many frames (default: all; Ctrl-C stops a camera)")
    args = p.parse_args()
    infer.run(args.checkpoint, args.input, args.out, score_thr=args.score_thr, device=args.device,
              batch_size=args.batch_size, max_frames=args.max_frames)


if __name__ == "__main__":
    cli.main(main)
