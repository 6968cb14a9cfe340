"""detpipe: the mmdetection tutorial workflow on torchvision detectors, run as a reproducible pipeline (README.md)."""
