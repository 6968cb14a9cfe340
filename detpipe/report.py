"""The report stage: one self-contained HTML page (figures inlined) about a training run and its evaluation.

Every upstream file and the MLflow run are read and checked before the page is built; the page is written
atomically and then attached to the training run in MLflow.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import sys
from pathlib import Path

import yaml
from PIL import Image

from detpipe import config, tracking
from detpipe.errors import DetpipeError
from detpipe.files import read_json, read_json_keys, write_text
from detpipe.images import ann_mask, read_rgb
from detpipe.visualize import data_uri, draw


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _read_csv(path: Path, what: str, columns: tuple[str, ...]) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DetpipeError(f"{path}: {what} is missing") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DetpipeError(f"{path}: malformed CSV in {what} ({exc})") from None
    if not rows or not set(columns) <= set(rows[0]):
        raise DetpipeError(f"{path}: {what} has no rows with the columns {', '.join(columns)}")
    return rows


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def curves(history: list[dict]) -> str:
    import matplotlib  # heavy: imported when the figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))

    def points(key: str) -> tuple[list[int], list[float]]:  # epochs that were not validated have empty cells
        rows = [(int(r["epoch"]), float(r[key])) for r in history if r.get(key) not in ("", None)]
        return [e for e, _ in rows], [v for _, v in rows]

    for key in [k for k in history[0] if k.startswith("train_") and k != "train_img_per_s"]:
        ax1.plot(*points(key), marker="o", label=key[6:])
    ax1.set(xlabel="epoch", ylabel="loss", title="training losses")
    ax1.legend(fontsize=8)
    for key in [k for k in history[0] if k.startswith("val_")]:
        ax2.plot(*points(key), marker="o", label=key[4:])
    ax2.set(xlabel="epoch", ylabel="mAP", title="validation mAP", ylim=(0, 1))
    ax2.legend(fontsize=8)
    uri = _figure_uri(fig)
    plt.close(fig)
    return uri


def samples(val_coco: dict, predictions: list[dict], image_root: Path, count: int, score_thr: float) -> list[str]:
    """Data URIs of side-by-side pictures: ground truth (left) and predictions (right)."""
    cats = [c["id"] for c in val_coco["categories"]]
    names = [c["name"] for c in val_coco["categories"]]
    index = {cid: i for i, cid in enumerate(cats)}
    by_image: dict[int, list] = {}
    for det in predictions:
        if det["score"] >= score_thr:
            by_image.setdefault(det["image_id"], []).append(det)
    gts: dict[int, list] = {}
    for ann in val_coco["annotations"]:
        if not ann.get("iscrowd"):  # ignore regions are not objects to draw
            gts.setdefault(ann["image_id"], []).append(ann)
    uris = []
    for info in val_coco["images"][:count]:
        image = read_rgb(Path(image_root) / info["file_name"])
        h, w = info["height"], info["width"]
        scale = max(1, 256 // max(h, w))
        halves = []
        for items, scored in ((gts.get(info["id"], []), False), (by_image.get(info["id"], []), True)):
            boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                     for a in items]
            labels = [index[a["category_id"]] for a in items]
            masks = None
            if items and all(a.get("segmentation") for a in items):
                masks = [ann_mask(a, h, w) for a in items]
            halves.append(draw(image, boxes, labels, names, [a["score"] for a in items] if scored else None,
                               masks, scale=scale))
        pair = Image.new("RGB", (halves[0].width * 2 + 8, halves[0].height), "white")
        pair.paste(halves[0], (0, 0))
        pair.paste(halves[1], (halves[0].width + 8, 0))
        uris.append(data_uri(pair))
    return uris


def earlier_runs_table(experiment: str) -> str:
    df = tracking.earlier_runs(experiment)
    if df.empty:
        return "<p><em>no runs</em></p>"
    wanted = ["run_id", "tags.mlflow.runName", "start_time", "status", "params.model.name", "params.model.backbone",
              "params.train.epochs", "params.train.lr", "params.seed", "metrics.eval_bbox_mAP",
              "metrics.eval_bbox_mAP50", "metrics.eval_segm_mAP"]
    cols = [c for c in wanted if c in df.columns]
    rows = df[cols].astype(object).where(df[cols].notna(), None).to_dict("records")
    for r in rows:
        r["run_id"] = r["run_id"][:8]
        r["start_time"] = str(r["start_time"])[:19]
    return _table(rows, cols)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>detpipe report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f2f2f2; }}
.headline {{ display: flex; gap: 1.5em; }}
.metric {{ border: 1px solid #ccc; border-radius: 6px; padding: .6em 1.2em; }}
.metric b {{ display: block; font-size: 26px; }}
.samples img {{ margin: 4px; border: 1px solid #ddd; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 13px; }}
</style></head><body>
<h1>detpipe report: {title}</h1>
<p>{subtitle}</p>
<h2>Headline metrics (val split)</h2>
<div class="headline">{headline}</div>
<h2>Per-class AP</h2>
{per_class}
<h2>Training curves</h2>
<img alt="training curves" src="{curves}">
<h2>Samples: ground truth (left) and predictions (right, score &ge; {score_thr})</h2>
<div class="samples">{samples}</div>
<h2>Dataset</h2>
{dataset}
<h2>Run metadata</h2>
{meta}
<h3>Params</h3>
<pre>{params}</pre>
<h2>Runs of experiment “{experiment}” in MLflow</h2>
{runs}
</body></html>
"""


def _inputs(data_dir: Path, train_dir: Path, eval_dir: Path) -> dict:
    """Every upstream file the page needs, read and checked: a one-line error names the first bad one."""
    for folder, stage in ((data_dir, "convert"), (train_dir, "train"), (eval_dir, "evaluate")):
        if not folder.is_dir():
            raise DetpipeError(f"{folder}: missing; run the {stage} stage first")
    metrics = read_json_keys(eval_dir / "metrics.json", "evaluation metrics", ("bbox", "num_images", "num_detections"))
    for t in ("bbox", "segm"):
        if t in metrics and not (isinstance(metrics[t], dict) and {"mAP", "mAP50", "mAP75"} <= metrics[t].keys()):
            raise DetpipeError(f"{eval_dir / 'metrics.json'}: evaluation metrics {t} lacks mAP, mAP50 or mAP75")
    predictions = read_json(eval_dir / "predictions.json", "predictions")
    if not isinstance(predictions, list):
        raise DetpipeError(f"{eval_dir / 'predictions.json'}: predictions are not a JSON list")
    trained = read_yaml_mapping(train_dir / "config.yaml", "training config")
    return {
        "metrics": metrics,
        "run": read_json_keys(train_dir / "run.json", "training run record",
                              ("run_id", "experiment", "tracking_uri", "git_commit", "data_hash", "device")),
        "stats": read_json_keys(data_dir / "stats.json", "conversion stats", ("splits",)),
        "val": read_json_keys(data_dir / "val.json", "COCO file", ("images", "annotations", "categories")),
        "predictions": predictions,
        "history": _read_csv(train_dir / "train_log.csv", "training log", ("epoch", "train_loss")),
        "per_class": _read_csv(eval_dir / "per_class.csv", "per-class AP", ("class",)),
        "trained": trained,
        "config_text": (train_dir / "config.yaml").read_text(),
    }


def read_yaml_mapping(path: Path, what: str) -> config.Config:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DetpipeError(f"{path}: {what} is missing") from None
    except yaml.YAMLError as exc:
        raise DetpipeError(f"{path}: malformed YAML in {what} ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict) or not {"dataset", "model", "train"} <= data.keys():
        raise DetpipeError(f"{path}: {what} lacks dataset, model or train")
    return config.Config(data)


def build_report(cfg, inputs: dict, image_root: Path) -> str:
    metrics, run, stats, history = inputs["metrics"], inputs["run"], inputs["stats"], inputs["history"]
    trained = inputs["trained"]  # the run's own params
    headline = "".join(
        f'<div class="metric">{t} {k}<b>{metrics[t][k]:.3f}</b></div>'
        for t in ("bbox", "segm") if t in metrics for k in ("mAP", "mAP50", "mAP75"))
    dataset_rows = [{"split": s, "images": v["images"], "objects": v["objects"], "ignored": v["ignored"],
                     **v["objects_per_class"], **v["boxes_changed"]} for s, v in stats["splits"].items()]
    meta_rows = [{"key": k, "value": v} for k, v in [
        ("MLflow run", run["run_id"]), ("experiment", run["experiment"]), ("tracking URI", run["tracking_uri"]),
        ("git commit", run["git_commit"]), ("dataset", trained.dataset), ("data content hash", run["data_hash"]),
        ("device", run["device"]), ("val images", metrics["num_images"]),
        ("detections saved", metrics["num_detections"])]]
    model = trained.model
    return PAGE.format(
        title=html.escape(cfg.experiment),
        subtitle=html.escape(f"{model.name} / {model.backbone} on {trained.dataset}, "
                             f"{len(history)} epochs, lr {trained.train.lr}"),
        headline=headline,
        per_class=_table(inputs["per_class"]),
        curves=curves(history),
        score_thr=cfg.report.score_thr,
        samples="".join(f'<img alt="sample {i}" src="{u}">' for i, u in enumerate(
            samples(inputs["val"], inputs["predictions"], image_root, cfg.report.num_samples,
                    cfg.report.score_thr))),
        dataset=_table(dataset_rows),
        meta=_table(meta_rows),
        params=html.escape(inputs["config_text"]),
        experiment=html.escape(cfg.experiment),
        runs=earlier_runs_table(cfg.experiment),
    )


def run(cfg, data_dir: Path, image_root: Path, train_dir: Path, eval_dir: Path, out: Path) -> None:
    """Write the report of ``train_dir``'s run to ``out`` and attach it to that MLflow run."""
    data_dir, image_root, train_dir, eval_dir, out = map(Path, (data_dir, image_root, train_dir, eval_dir, out))
    inputs = _inputs(data_dir, train_dir, eval_dir)
    mlflow_run = tracking.Run.existing(inputs["run"]["run_id"], train_dir / "run.json")
    write_text(out, build_report(cfg, inputs, image_root))
    mlflow_run.log_artifact(out, "report")
    print(f"report -> {out}", file=sys.stderr)
