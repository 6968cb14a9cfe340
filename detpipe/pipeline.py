"""The pipeline table: each stage's command, data, params and library code, read by the Snakefile and
rendered into dvc.yaml (``python -m detpipe.pipeline > dvc.yaml``; a test fails when they differ).

A stage's code is its script plus the library modules it loads (``modules``): both tools rerun a stage
when one of those files changes, and only then. ``tests/test_pipeline.py`` imports each stage script in
a fresh interpreter and fails when it loads a ``detpipe`` module its list does not name (or names one it
does not load), so the lists cannot go stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from detpipe.config import PARAMS_FILE, TRAINING_KEYS, dotted

ROOT = Path(__file__).resolve().parents[1]

PARAMS = PARAMS_FILE.as_posix()
DATASETS = "params/datasets.yaml"
# A preset may set any key, so every stage reads the key that selects it and every preset file.
PRESETS = tuple(sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "params/presets").glob("*.yaml")))
RAW, COCO, TRAIN, EVAL, REPORT = "data/raw", "data/coco", "runs/train", "runs/eval", "reports/index.html"
FIGURES = "reports/figures"  # the report's figures as files: Snakemake's report() marks them (workflow/rules)
PLUGINS = "workflow/formats"  # the project's own dataset formats (see docs/datasets.md)
LOGS = "logs"

# Layers, lowest first: a module imports only from its own layer or below (tests/test_pipeline.py).
CORE = ("errors", "files", "images", "distributed", "synthetic", "archives", "formats", "formats.coco", "formats.kitti",
        "formats.via", "formats.voc", "formats.yolo", "formats.middle", "conversion", "transforms", "datasets",
        "models", "swap", "rpn", "syncfree", "metrics", "analysis", "engine", "visualize", "cli")
SERVICES = ("config", "tracking")
STAGE_MODULES = ("download", "convert", "train", "evaluate", "report", "apis", "infer", "compare")
LAYERS = (CORE, SERVICES, STAGE_MODULES, ("pipeline",))

_BASE = ("cli", "errors", "config", "files")  # every stage script parses flags and params the same way
_FORMATS = ("formats", "formats.coco", "formats.kitti", "formats.via", "formats.voc", "formats.yolo")
_MODEL = ("images", "transforms", "datasets", "metrics", "distributed", "engine", "models", "tracking")


@dataclass(frozen=True)
class Stage:
    name: str
    args: dict[str, str]                             # command-line flag -> path, in the order of the command
    deps: list[str]                                  # data the stage reads: earlier stages' outputs, folders
    outs: list[str]                                  # folders are written whole by the stage
    params: dict[str, list[str] | None]              # file -> keys (None: every key in the file)
    modules: tuple[str, ...]                         # detpipe modules the stage loads (the package itself implied)
    metrics: list[str] = field(default_factory=list)  # small JSON files kept out of the cache

    @property
    def script(self) -> str:
        return f"stages/{self.name}.py"

    @property
    def cmd(self) -> str:
        return " ".join(["python", self.script, *(f"--{flag} {path}" for flag, path in self.args.items())])

    @property
    def code(self) -> list[str]:
        """The files whose change reruns the stage: its script and every library module it loads."""
        return [self.script, *(module_file(m) for m in ("", *self.modules))]

    @property
    def dir_outs(self) -> list[str]:
        return [o for o in self.outs if not Path(o).suffix]

    @property
    def log(self) -> str:
        return f"{LOGS}/{self.name}.log"


def module_file(module: str) -> str:
    """``formats.coco`` -> ``detpipe/formats/coco.py``; a package -> its ``__init__.py``; "" -> the package's."""
    path = Path("detpipe", *module.split(".")) if module else Path("detpipe")
    return (path / "__init__.py" if (ROOT / path).is_dir() else path.with_suffix(".py")).as_posix()


_PRESET = dict.fromkeys(PRESETS)  # whole files
EVAL_FILES = [f"{EVAL}/predictions.json", f"{EVAL}/per_class.csv", f"{EVAL}/run.json"]  # run.json: its MLflow run
EVAL_ANALYSIS = [f"{EVAL}/analysis.json", f"{EVAL}/plots"]  # docs/evaluation.md
STAGES = {s.name: s for s in [
    Stage("download", args={"out": RAW}, deps=[], outs=[RAW],
          params={PARAMS: ["preset", "dataset", "download"], DATASETS: None, **_PRESET},
          modules=(*_BASE, "archives", "synthetic", "download")),
    Stage("convert", args={"src": RAW, "formats": PLUGINS, "out": COCO}, deps=[RAW, PLUGINS], outs=[COCO],
          params={PARAMS: ["preset", "dataset", "convert"], DATASETS: None, **_PRESET},
          modules=(*_BASE, *_FORMATS, "conversion", "convert")),
    Stage("train", args={"data": COCO, "images": RAW, "out": TRAIN}, deps=[RAW, COCO], outs=[TRAIN],
          params={PARAMS: list(TRAINING_KEYS), **_PRESET},
          modules=(*_BASE, *_MODEL, "swap", "rpn", "syncfree", "train")),
    Stage("evaluate", args={"data": COCO, "images": RAW, "model": TRAIN, "out": EVAL}, deps=[RAW, COCO, TRAIN],
          outs=[*EVAL_FILES, *EVAL_ANALYSIS], params={PARAMS: ["preset", "device", "threads", "evaluate"], **_PRESET},
          modules=(*_BASE, *_MODEL, "analysis", "evaluate"), metrics=[f"{EVAL}/metrics.json"]),
    Stage("report", args={"data": COCO, "images": RAW, "model": TRAIN, "eval": EVAL, "out": REPORT,
                          "figures": FIGURES},
          deps=[RAW, COCO, TRAIN, *EVAL_FILES, *EVAL_ANALYSIS, f"{EVAL}/metrics.json"], outs=[REPORT, FIGURES],
          params={PARAMS: ["preset", "experiment", "report"], **_PRESET},
          modules=(*_BASE, "images", "visualize", "tracking", "report")),
]}


# Snakemake evaluates every rule's params on each run, no-op included: libyaml's parser is ~10x the pure-Python one.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def param_values(stage: str, root: Path = Path(".")) -> dict:
    """The values of a stage's params, for Snakemake's params trigger (it reruns a rule when they change)."""
    values = {}
    for file, keys in STAGES[stage].params.items():
        data = yaml.load((root / file).read_text(), Loader=_YAML_LOADER) or {}
        values[file] = data if keys is None else {k: dotted(data, k) for k in keys}
    return values


# Top-level DVC plots (`dvc plots show`, `dvc plots diff`; docs/evaluation.md): file -> display properties. The eval
# files are the names detpipe.analysis.write_plots makes (tests/test_analysis.py checks that and renders each plot).
PLOTS = {
    f"{TRAIN}/iter_log.csv": {"title": "Training loss per iteration", "x": "iter", "y": "loss"},
    f"{TRAIN}/train_log.csv": {"title": "Validation mAP per epoch", "x": "epoch",
                               "y": ["val/bbox_mAP", "val/bbox_mAP_50"]},  # detpipe.metrics.named_stats
    f"{EVAL}/plots/pr_curves.csv": {"title": "Precision-recall per class (IoU 0.5, VOC matching)", "x": "recall",
                                    "y": "precision", "template": "pr_by_class"},  # .dvc/plots/pr_by_class.json
    f"{EVAL}/plots/confusion.csv": {"title": "Confusion matrix with background (IoU 0.5)", "x": "actual",
                                    "y": "predicted", "template": "confusion"},
}


def dvc_yaml() -> str:
    stages = {}
    for s in STAGES.values():
        # A params file read whole (a preset, the dataset registry) is a file dep for DVC: dvc.lock keeps its hash.
        # As a params entry DVC copied every value of it into dvc.lock, once per stage, and re-read and compared
        # them on every run; that made a no-op `dvc repro` over 1.5x a one-stage project's (bench_noop.py).
        whole = [f for f, keys in s.params.items() if keys is None]
        entry = {
            "cmd": s.cmd,
            "deps": [*s.code, *s.deps, *whole],
            "params": [{f: k} for f, k in s.params.items() if k is not None],
            "outs": list(s.outs),
        }
        if s.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        stages[s.name] = entry
    doc = {"stages": stages, "plots": [{path: props} for path, props in PLOTS.items()]}
    header = "# Generated by `python -m detpipe.pipeline > dvc.yaml`; edit detpipe/pipeline.py instead.\n"
    return header + yaml.safe_dump(doc, sort_keys=False)


if __name__ == "__main__":
    print(dvc_yaml(), end="")
