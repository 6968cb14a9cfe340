"""The report stage: one self-contained HTML page (figures inlined) about a training run and its evaluation.

Sections: headline metrics (with the change against the experiment's best other run), dataset, training,
evaluation (per-class AP, precision-recall, confusion, worst and good images), provenance and the experiment's
runs (docs/evaluation.md, "The report"). The figures are also written as files (``--figures``) for Snakemake's
own report (``snakemake --report report.html``).

Every upstream file and the MLflow run are read and checked before the page is built; the figures and the page
are written atomically and then logged as a new MLflow child run of the training run (docs/tracking.md).
"""

from __future__ import annotations

import csv
import html
import json
import shlex
import sys
from pathlib import Path

from PIL import Image

from detpipe import config, tracking, visualize
from detpipe.errors import DetpipeError
from detpipe.files import atomic_dir, read_json, read_json_keys, write_text
from detpipe.images import ann_mask, read_rgb

PANEL = 320  # longest side of an image in the report, pixels (each of a ground truth | predictions pair)
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store
# MLflow 3's UI opens an experiment in its GenAI mode (traces) unless told the workflow type: with this the link
# lands on the runs table (the UI ignores the experiment tag mlflow.experimentKind; README, "MLflow").
UI_MODE = "workflowType=machine_learning"
HEADLINE = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "voc_mAP_50", "bbox_AR_100")


def _read_csv(path: Path, what: str, columns: tuple[str, ...], allow_empty: bool = False) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except FileNotFoundError:
        raise DetpipeError(f"{path}: {what} is missing") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DetpipeError(f"{path}: malformed CSV in {what} ({exc})") from None
    if (not rows and not allow_empty) or not set(columns) <= set(reader.fieldnames or ()):
        raise DetpipeError(f"{path}: {what} has no rows with the columns {', '.join(columns)}")
    return rows


def read_training_config(path: Path) -> tuple[config.Config, str]:
    """The training config as a Config, and its text as written (shown on the page): one read."""
    data, text = config.read_yaml_text(path, "training config")
    if not isinstance(data, dict) or not {"dataset", "model", "train"} <= data.keys():
        raise DetpipeError(f"{path}: training config lacks dataset, model or train")
    return config.Config(data), text


def _inputs(data_dir: Path, train_dir: Path, eval_dir: Path) -> dict:
    """Every upstream file the page needs, read and checked: a one-line error names the first bad one."""
    for folder, stage in ((data_dir, "convert"), (train_dir, "train"), (eval_dir, "evaluate")):
        if not folder.is_dir():
            raise DetpipeError(f"{folder}: missing; run the {stage} stage first")
    metrics = read_json_keys(eval_dir / "metrics.json", "evaluation metrics",
                             ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "num_images", "num_detections"))
    if any(k.startswith("segm_") for k in metrics) and not {"segm_mAP", "segm_mAP_50", "segm_mAP_75"} <= set(metrics):
        raise DetpipeError(f"{eval_dir / 'metrics.json'}: evaluation metrics lack segm_mAP, segm_mAP_50 or segm_mAP_75")
    predictions = read_json(eval_dir / "predictions.json", "predictions")
    if not isinstance(predictions, list):
        raise DetpipeError(f"{eval_dir / 'predictions.json'}: predictions are not a JSON list")
    trained, config_text = read_training_config(train_dir / "config.yaml")
    stats = read_json_keys(data_dir / "stats.json", "conversion stats", ("splits",))
    coco_keys = ("images", "annotations", "categories")
    splits = {s: read_json_keys(data_dir / f"{s}.json", "COCO file", coco_keys) for s in stats["splits"]}
    if "val" not in splits:
        splits["val"] = read_json_keys(data_dir / "val.json", "COCO file", coco_keys)
    return {
        "metrics": metrics,
        "run": read_json_keys(train_dir / "run.json", "training run record",
                              ("run_id", "experiment", "tracking_uri", "git_commit", "data_hash", "device")),
        "stats": stats,
        "splits": splits,
        "predictions": predictions,
        "history": _read_csv(train_dir / "train_log.csv", "training log", ("epoch", "train/loss")),
        "iterations": _read_csv(train_dir / "iter_log.csv", "iteration log", ("epoch", "iter", "lr", "loss")),
        "eval_run": read_json_keys(eval_dir / "run.json", "evaluation run record", ("run_id",))
        if (eval_dir / "run.json").is_file() else None,  # none: an evaluation not logged (evaluate --checkpoint)
        "per_class": _read_csv(eval_dir / "per_class.csv", "per-class AP", ("class", "bbox_AP", "bbox_AP_50")),
        "analysis": read_json_keys(eval_dir / "analysis.json", "error analysis",
                                   ("per_class", "confusion", "worst_images", "best_images", "score_thr")),
        "pr_curves": _read_csv(eval_dir / "plots/pr_curves.csv", "precision-recall curves",
                               ("class", "recall", "precision"), allow_empty=True),
        "trained": trained,
        "config_text": config_text,
        "config_file": str(train_dir / "config.yaml"),
    }


# --- HTML pieces ---------------------------------------------------------------------------------------------

def _esc(value) -> str:
    return html.escape(_fmt(value))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def _table(rows: list[dict], columns: list[str] | None = None, raw: tuple[str, ...] = ()) -> str:
    """An HTML table; cells of the ``raw`` columns are HTML already."""
    if not rows:
        return "<p><em>none</em></p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{r.get(c, '') if c in raw else _esc(r.get(c))}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(figures: dict, name: str, data: bytes, alt: str, caption: str = "") -> str:
    """Keep ``data`` as ``figures/<name>`` and return it inlined, with a caption."""
    figures[name] = data
    mime = "image/png" if name.endswith(".png") else "image/jpeg"
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="{visualize.data_uri(data, mime)}">{cap}</figure>'


def _delta(value: float, earlier: float | None) -> str:
    if earlier is None:
        return ""
    change = value - earlier
    kind = "up" if change > 5e-5 else "down" if change < -5e-5 else "same"
    return f'<span class="delta {kind}">{change:+.3f}</span>'


# --- the sections --------------------------------------------------------------------------------------------

def best_other_run(rows: list[dict], run_id: str, data_hash: str | None = None) -> dict | None:
    """The comparison's best training run other than ``run_id`` that has an evaluation (rows come best first), and
    trained on the same data (``data_hash``, the run's tag): other data has another val set, whose numbers do not
    compare."""
    return next((r for r in rows if r["run_id"] != run_id and r.get("bbox_mAP") is not None
                 and (data_hash is None or r.get("data_hash") == data_hash[:12])), None)


def headline(metrics: dict, rows: list[dict], run_id: str, data_hash: str | None = None) -> str:
    best = best_other_run(rows, run_id, data_hash)
    cards = "".join(
        f'<div class="metric"><span>{k}</span><b>{metrics[k]:.3f}</b>'
        f'{_delta(metrics[k], best.get(k) if best else None)}</div>'
        for k in HEADLINE if isinstance(metrics.get(k), (int, float)))
    elsewhere = best_other_run(rows, run_id) if best is None else None
    if elsewhere is not None:
        against = ("No other run of this experiment on the same data has been evaluated yet: nothing to compare "
                   "with (runs on other data, listed under Runs of the experiment, score another val set).")
    elif best is None:
        against = "No other run of this experiment has been evaluated yet: nothing to compare with."
    else:
        against = (f"Changes are against the best other run of the experiment on the same data, "
                   f"<b>{html.escape(best['run'])}</b> (<code>{best['run_id'][:8]}</code>, bbox_mAP "
                   f"{best['bbox_mAP']:.3f}).")
    return (f'<div class="headline">{cards}</div><p class="note">{against} COCO metrics on '
            f'{metrics["num_images"]} val images, {metrics["num_detections"]} detections kept; voc_mAP_50: '
            f'VOC-style AP at IoU 0.5 (docs/evaluation.md).</p>')


def _panel(info: dict, image_root: Path, items: list[dict], names: list[str], index: dict, *,
           scored: bool = False, marked: list[dict] = (), scale: float = 1) -> Image.Image:
    """One image with ``items`` (annotations or detections, with their masks) and ``marked`` boxes
    (``{"mark", "class", "bbox"}``) drawn."""
    image = read_rgb(Path(image_root) / info["file_name"])
    h, w = info["height"], info["width"]
    everything = [*items, *marked]
    boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
             for a in everything]
    labels = [index[a["category_id"]] if "category_id" in a else names.index(a["class"]) for a in everything]
    masks = [ann_mask(a, h, w) if a.get("segmentation") else None for a in items] + [None] * len(marked)
    scores = [a.get("score") for a in everything] if scored else None
    marks = [None] * len(items) + [m["mark"] for m in marked]
    return visualize.draw(image, boxes, labels, names, scores, masks, scale=scale, marks=marks)


def _scale(info: dict) -> float:
    return PANEL / max(info["height"], info["width"])


def dataset_section(stats: dict, splits: dict, image_root: Path, count: int, figures: dict) -> str:
    names = [c["name"] for c in splits["val"]["categories"]]
    per_split = stats["splits"]
    order = list(per_split)
    count_rows = [{"": "images", **{s: per_split[s]["images"] for s in order}},
                  {"": "objects", **{s: per_split[s]["objects"] for s in order}},
                  *({"": f"objects: {n}", **{s: per_split[s]["objects_per_class"].get(n, 0) for s in order}}
                    for n in names),
                  {"": "ignore regions", **{s: per_split[s]["ignored"] for s in order}}]
    changed: dict[str, int] = {}
    for s in order:
        for k, v in per_split[s]["boxes_changed"].items():
            changed[k] = changed.get(k, 0) + v
    changed_note = ", ".join(f"{k}: {v}" for k, v in changed.items() if v) or "none"
    sizes = {s: [(a["bbox"][2] * a["bbox"][3]) ** 0.5 for a in coco["annotations"] if not a.get("iscrowd")]
             for s, coco in splits.items()}
    hist = _figure(figures, "box_sizes.png", visualize.box_size_chart(sizes), "histogram of box sizes",
                   "Object sizes per split; the dashed lines are COCO's small / medium / large limits "
                   "(bbox_mAP_s, _m, _l).")
    source = "train" if "train" in splits else "val"
    coco = splits[source]
    index = {c["id"]: i for i, c in enumerate(coco["categories"])}
    gts: dict[int, list] = {}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd"):  # ignore regions are not objects to draw
            gts.setdefault(ann["image_id"], []).append(ann)
    images = coco["images"]
    picks = sorted({round(i * (len(images) - 1) / max(count - 1, 1)) for i in range(count)}) if images else []
    cards = "".join(
        _figure(figures, f"ground_truth_{k + 1}.jpg",
                visualize.encode(_panel(images[i], image_root, gts.get(images[i]["id"], []), names, index,
                                        scale=_scale(images[i]))),
                f"{source} image with ground truth", html.escape(images[i]["file_name"]))
        for k, i in enumerate(picks))
    return (f'<div class="cols"><div>{_table(count_rows)}<p class="note">Boxes changed by the conversion: '
            f'{html.escape(changed_note)}.</p></div><div>{hist}</div></div>'
            f"<h3>Ground truth ({source} split, {len(picks)} of {len(images)} images)</h3>"
            f'<div class="gallery">{cards}</div>')


def training_section(iterations: list[dict], history: list[dict], trained, figures: dict) -> str:
    components = [c for c in iterations[0] if c.startswith("loss_")]
    note = ("loss components per iteration" if components else
            "the total loss per iteration (iter_log.csv); the components (classifier, box regression, ...) are "
            "per-epoch means from train_log.csv, drawn as steps at each epoch's last iteration")
    t = trained.train
    chart = _figure(figures, "training.png", visualize.training_chart(iterations, history), "training curves",
                    f"Left: {note}. Middle: learning rate. Right: validation mAP after each validated epoch.")
    last = history[-1]
    summary = (f"{len(history)} epochs, {len(iterations)} iterations logged, batch size {t.batch_size}, "
               f"base lr {t.lr}; last epoch: loss {float(last['train/loss']):.4f}")
    return f"<p>{html.escape(summary)}.</p>{chart}"


def per_class_table(per_class: list[dict], analysis: dict) -> str:
    voc = analysis["per_class"]
    has_segm = "segm_AP" in per_class[0] if per_class else False
    rows = []
    for r in per_class:
        a = voc.get(r["class"], {})
        ap = float(r["bbox_AP"]) if r["bbox_AP"] not in ("", None) else None
        bar = (f'<div class="bar"><div style="width:{100 * ap:.1f}%"></div></div>' if ap is not None
               else "<em>no objects</em>")
        row = {"class": r["class"], "objects": a.get("num_gts"), "detections": a.get("num_dets"),
               "bbox AP": ap, "": bar, "bbox AP50": _float(r["bbox_AP_50"]), "VOC AP50": a.get("voc_AP_50")}
        if has_segm:
            row["segm AP"] = _float(r.get("segm_AP"))
        rows.append(row)
    columns = ["class", "objects", "detections", "bbox AP", "", "bbox AP50", "VOC AP50"] + (
        ["segm AP"] if has_segm else [])
    return _table(rows, columns, raw=("",))


def _float(value) -> float | None:
    return None if value in ("", None) else float(value)


def error_images(entries: list[dict], coco: dict, predictions: list[dict], image_root: Path, score_thr: float,
                 count: int, figures: dict, prefix: str) -> str:
    """Ground truth (missed objects marked) beside predictions (false positives and wrong classes marked)."""
    names = [c["name"] for c in coco["categories"]]
    index = {c["id"]: i for i, c in enumerate(coco["categories"])}
    infos = {im["id"]: im for im in coco["images"]}
    wanted = {e["image_id"] for e in entries[:count]}
    dets: dict[int, list] = {}
    for d in predictions:
        if d["image_id"] in wanted and d["score"] >= score_thr:
            dets.setdefault(d["image_id"], []).append(d)
    gts: dict[int, list] = {}
    for ann in coco["annotations"]:
        if ann["image_id"] in wanted and not ann.get("iscrowd"):
            gts.setdefault(ann["image_id"], []).append(ann)
    cards = []
    for k, e in enumerate(entries[:count]):
        info = infos[e["image_id"]]
        missed = [{"mark": "missed", **b} for b in e["missed_boxes"]]
        wrong = [{"mark": f"≠{b['actual']}", **b} for b in e["wrong_class_boxes"]]
        false_pos = [{"mark": "FP", **b} for b in e["false_positive_boxes"]]
        flagged = {(b["class"], tuple(b["bbox"]), b["score"]) for b in [*wrong, *false_pos]}
        kept = [d for d in dets.get(e["image_id"], []) if (names[index[d["category_id"]]],
                tuple(round(v, 2) for v in d["bbox"]), round(d["score"], 4)) not in flagged]
        not_found = {(b["class"], tuple(b["bbox"])) for b in missed}
        found = [a for a in gts.get(e["image_id"], []) if (names[index[a["category_id"]]], tuple(a["bbox"]))
                 not in not_found]
        scale = _scale(info)
        left = _panel(info, image_root, found, names, index, marked=missed, scale=scale)
        right = _panel(info, image_root, kept, names, index, scored=True, marked=[*false_pos, *wrong],
                       scale=scale)
        caption = (f"{html.escape(info['file_name'])}: {e['objects']} objects, {e['missed']} missed, "
                   f"{e['false_positives']} false positives, {e['wrong_class']} wrong class")
        cards.append(_figure(figures, f"{prefix}_{k + 1}.jpg", visualize.encode(visualize.side_by_side(left, right)),
                             f"{prefix} image: ground truth and predictions", caption))
    return f'<div class="gallery wide">{"".join(cards)}</div>' if cards else "<p><em>none</em></p>"


def evaluation_section(inputs: dict, image_root: Path, cfg, figures: dict) -> str:
    analysis, coco = inputs["analysis"], inputs["splits"]["val"]
    voc_ap = {name: c.get("voc_AP_50") for name, c in analysis["per_class"].items()}
    pr = _figure(figures, "pr_curves.png", visualize.pr_chart(inputs["pr_curves"], voc_ap), "precision-recall curves",
                 "Precision-recall per class from the VOC matching at IoU 0.5; the legend gives VOC AP50.")
    confusion = _figure(figures, "confusion.png",
                        visualize.confusion_chart(analysis["confusion"]["labels"], analysis["confusion"]["matrix"]),
                        "confusion matrix", f"Detections scoring at least {analysis['score_thr']} matched at IoU "
                        "0.5; a row's colours are shares of that actual class; background: no object / not found.")
    count = cfg.report.num_samples
    args = (coco, inputs["predictions"], image_root, cfg.report.score_thr, count, figures)
    how = (f"Left: ground truth, objects no detection found marked <b>missed</b>. Right: detections scoring at least "
           f"{cfg.report.score_thr} (report.score_thr) with masks where the model has them; <b>FP</b>: a false "
           f"positive, <b>≠class</b>: a detection of the wrong class over an object of that class (analysis at "
           f"score ≥ {analysis['score_thr']}, so a marked box may score below report.score_thr).")
    return (f"<h3>Per-class AP</h3>{per_class_table(inputs['per_class'], analysis)}"
            f'<div class="cols"><div>{pr}</div><div>{confusion}</div></div>'
            f"<h3>Worst and good images</h3><p class=\"note\">{how}</p>"
            f'<div class="cols"><div><h4>Most errors</h4>'
            f'{error_images(analysis["worst_images"], *args, "worst")}</div>'
            f'<div><h4>No errors, most objects</h4>{error_images(analysis["best_images"], *args, "good")}</div></div>')


PARAMS = config.PARAMS_FILE.as_posix()  # the pipeline's params file, as the commands name it


def _hydra_value(value) -> str:
    """A params value in the override grammar of ``dvc exp run -S`` (Hydra's): strings quoted, so that ``=``,
    ``,`` and spaces stay part of them."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(map(_hydra_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)


def _overrides(tags: dict):
    """``(item, key, value)`` of each ``--set`` override recorded in launch ``tags``, the value read as ``--set``
    reads it (:func:`detpipe.config.parse_value`)."""
    for item in shlex.split(tags.get("overrides", "")):
        key, _, raw = item.partition("=")
        yield item, key, config.parse_value(raw)


def _read_by_training(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") or k.startswith(f"{key}.") for k in config.TRAINING_KEYS)


def reproduce_command(commit: str, tags: dict, later: tuple[dict, ...] = (), trained: dict | None = None,
                      config_file: str = "runs/train/config.yaml") -> str:
    """Shell lines that rebuild this report from its commit, the way the run was launched.

    ``tags`` are the training run's launch tags, ``later`` those of the stages after it (tracking.launch_tags):
    their ``--set`` overrides become ``dvc exp run -S 'params/detpipe.yaml:++KEY=VALUE'`` (``++`` also sets a key
    the file leaves to its default), after copying in the params file training read, if another. A later stage's
    override of a key training also reads (``device``, ``seed``, ...) is applied only where it equals the value
    training used (``trained``, its resolved config); otherwise it would change the training, so a comment names
    it instead. Likewise a params file that only a later stage read. ``config_file``: where the run's resolved
    params are.
    """
    sha = commit.removesuffix("-dirty")
    settings, notes, params_file = {}, [], tags.get("params_file")
    settings.update((key, value) for _, key, value in _overrides(tags))
    for stage_tags in later:
        stage = stage_tags.get("stage", "a later stage")
        if stage_tags.get("params_file") != params_file:
            notes.append(f"# {stage} read {stage_tags.get('params_file') or PARAMS}, training "
                         f"{params_file or PARAMS}: not applied")
        for item, key, value in _overrides(stage_tags):
            used = config.dotted(trained, key) if trained is not None else settings.get(key)
            if _read_by_training(key) and settings.get(key, used) != value:
                notes.append(f"# {stage} ran with --set {item}; training read {key} too, so it is not applied")
            else:
                settings[key] = value
    if tags.get("launcher") == "dvc exp run" and tags.get("dvc_exp_name"):
        steps = [f"dvc exp apply {tags['dvc_exp_name']}", "dvc repro"]
        by_hand = [f"--set {item}" for t in later for item, _, _ in _overrides(t)]
        notes = [f"# stages after training ran by hand with {' '.join(by_hand)}: not part of the experiment"] \
            if by_hand else []
    elif settings or params_file:
        steps = [f"cp {shlex.quote(params_file)} {PARAMS}  # the params file training read"] if params_file \
            else []
        sets = " ".join(f"-S {shlex.quote(f'{PARAMS}:++{k}={_hydra_value(v)}')}" for k, v in settings.items())
        steps.append(f"dvc exp run {sets}".rstrip())
    elif tags.get("launcher") == "dvc repro":
        steps = ["dvc repro"]
    else:
        steps = ["snakemake --cores 1 report"]
    lines = [f"git checkout {sha}", *notes, *steps]
    if commit.endswith("-dirty"):
        lines.insert(0, "# the run had uncommitted changes: the commit alone may not reproduce it; the resolved "
                        f"params are {config_file}")
    elif commit == "unknown":
        lines = ["# the run was not made in a git checkout: no commit to return to", *notes, *steps]
    return "\n".join(lines)


def mlflow_links(run: dict, mlflow: dict) -> tuple[str, str, str]:
    """The MLflow UI (and how to start it) and links to the experiment's runs and to this run."""
    uri = tracking.without_credentials(run["tracking_uri"])  # a record written before credentials were stripped
    if uri.startswith(("http://", "https://")):
        ui, start = uri.rstrip("/"), ""
    else:
        ui, start = MLFLOW_UI, f"mlflow ui --backend-store-uri {uri}"
    exp = mlflow["experiment_id"]
    return (start, f"{ui}/#/experiments/{exp}?{UI_MODE}",
            f"{ui}/#/experiments/{exp}/runs/{run['run_id']}?{UI_MODE}")


def provenance_section(inputs: dict, mlflow: dict) -> str:
    run, trained, stats = inputs["run"], inputs["trained"], inputs["stats"]
    start, runs_link, run_link = mlflow_links(run, mlflow)
    hashes = [(k, v) for k, v in run.items() if k.endswith("hash")]
    if stats.get("content_hash"):
        hashes.append(("raw data content hash (stats.json)", stats["content_hash"]))
    rows = [("MLflow training run", f'{html.escape(mlflow["run_name"])} <code>{run["run_id"]}</code> '
                                    f'(<a href="{html.escape(run_link)}">open</a>)'),
            ("MLflow evaluation run", f'<code>{inputs["eval_run"]["run_id"]}</code>' if inputs["eval_run"]
             else "not logged (evaluate --checkpoint)"),
            ("experiment", f'{html.escape(run["experiment"])} (<a href="{html.escape(runs_link)}">runs in the '
                           'MLflow UI</a>)'),
            ("tracking URI", f"<code>{html.escape(tracking.without_credentials(run['tracking_uri']))}</code>"),
            ("git commit", f"<code>{html.escape(run['git_commit'])}</code>"),
            *((k.replace("_", " "), f"<code>{html.escape(str(v))}</code>") for k, v in hashes),
            ("launched by", html.escape(mlflow["tags"].get("launcher", "unknown"))),
            ("device", html.escape(run["device"])),
            ("model", html.escape(f"{trained.model.name} / {trained.model.backbone} on {trained.dataset}"))]
    table = "<table class=\"kv\">" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"
    ui = (f"<p>MLflow UI: <code>{html.escape(start)}</code>, then open <a href=\"{html.escape(runs_link)}\">"
          f"{html.escape(runs_link)}</a> (the link lands on the runs table).</p>" if start else
          f'<p>MLflow UI: <a href="{html.escape(runs_link)}">{html.escape(runs_link)}</a></p>')
    command = html.escape(reproduce_command(run["git_commit"], mlflow["tags"], mlflow.get("later_tags", ()), trained,
                                            inputs["config_file"]))
    return (f"{table}<h3>Reproduce</h3><pre>{command}</pre>{ui}"
            f"<details><summary>Params of the run ({html.escape(inputs['config_file'])})</summary>"
            f"<pre>{html.escape(inputs['config_text'])}</pre></details>")


def runs_section(rows: list[dict] | str, run_id: str) -> str:
    """The experiment's training runs, best first (``python -m detpipe.compare``): key metrics, and the params
    that differ between the runs in one wrapped cell, so that the table fits the page."""
    if isinstance(rows, str):  # the comparison's one-line error, e.g. no training run logged yet
        return f"<p><em>{html.escape(rows)}</em></p>"
    metrics = [k for k in tracking.KEY_METRICS if k in rows[0]]
    base = {"run", "run_id", "status", "launch", "data_hash", *metrics}
    table = []
    for r in rows[:20]:
        differs = "; ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in base)
        name = html.escape(r["run"] or "")
        table.append({"run": f"<b>{name}</b> (this run)" if r["run_id"] == run_id else name,
                      "id": r["run_id"][:8], "launch": r["launch"], "data": r["data_hash"][:8],
                      **{m: r[m] for m in metrics},
                      "params that differ": f'<span class="wrap">{html.escape(differs)}</span>'})
    note = f"<p class=\"note\">{len(rows)} training runs, best first" + (
        ", the first 20 shown" if len(rows) > 20 else "") + "; metrics of each run's latest evaluation.</p>"
    return note + _table(table, raw=("run", "params that differ")).replace("<table>", '<table class="runs">', 1)


STYLE = """
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 0 16px 3em; max-width: 1180px; color: #222; }
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: .5em 0; z-index: 1; }
nav a { margin-right: 1.2em; color: #0b57d0; text-decoration: none; }
h1 { font-size: 24px; margin: .6em 0 .2em; } h2 { margin-top: 1.6em; border-bottom: 2px solid #eee; }
.sub { color: #555; margin: 0; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: 13px; max-width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; overflow-wrap: break-word; }
th { background: #f4f4f4; }
table.kv th { width: 14em; }
table.runs { width: 100%; table-layout: auto; }
.headline { display: flex; flex-wrap: wrap; gap: .8em; }
.metric { border: 1px solid #ccc; border-radius: 6px; padding: .4em 1em; min-width: 9em; }
.metric span { color: #555; font-size: 13px; } .metric b { display: block; font-size: 26px; }
.delta { font-size: 13px; font-weight: 600; } .up { color: #137333; } .down { color: #c5221f; } .same { color: #777; }
.note { color: #555; font-size: 13px; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 1.2em; align-items: start; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: .8em; }
.gallery.wide { grid-template-columns: 1fr; }
figure { margin: 0; min-width: 0; } figure img, img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #555; overflow-wrap: anywhere; }
.bar { width: 8em; height: .8em; background: #eee; } .bar div { height: 100%; background: #4a7fd4; }
pre { background: #f6f6f6; padding: .8em; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; }
code, .wrap { overflow-wrap: anywhere; }
"""


def build_report(cfg, inputs: dict, image_root: Path, mlflow: dict, comparison: list[dict] | str
                 ) -> tuple[str, dict[str, bytes]]:
    """The page and its figures (file name -> bytes, the same pictures the page inlines)."""
    metrics, run, trained = inputs["metrics"], inputs["run"], inputs["trained"]
    figures: dict[str, bytes] = {}
    rows = comparison if isinstance(comparison, list) else []
    sections = [
        ("headline", "Headline", headline(metrics, rows, run["run_id"], run["data_hash"])),
        ("dataset", "Dataset", dataset_section(inputs["stats"], inputs["splits"], image_root,
                                               cfg.report.num_samples, figures)),
        ("training", "Training", training_section(inputs["iterations"], inputs["history"], trained, figures)),
        ("evaluation", "Evaluation", evaluation_section(inputs, image_root, cfg, figures)),
        ("provenance", "Provenance", provenance_section(inputs, mlflow)),
        ("runs", "Runs of the experiment", runs_section(comparison, run["run_id"])),
    ]
    model = trained.model
    title = f"{mlflow['run_name']}"
    subtitle = (f"{model.name} / {model.backbone} on {trained.dataset}: {len(inputs['history'])} epochs, "
                f"experiment {run['experiment']}")
    nav = "".join(f'<a href="#{key}">{name}</a>' for key, name, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{name}</h2>{content}</section>' for key, name, content in sections)
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>detpipe report: {html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>detpipe report: {html.escape(title)}</h1><p class=\"sub\">{html.escape(subtitle)}</p>"
            f"<nav>{nav}</nav>{body}</body></html>\n")
    return page, figures


def run(cfg, data_dir: Path, image_root: Path, train_dir: Path, eval_dir: Path, out: Path,
        figures_dir: Path | None = None) -> None:
    """Write the report of ``train_dir``'s run to ``out`` (and its figures to ``figures_dir``, by default
    ``figures/`` beside ``out``); log it as a new MLflow child run of that training run (params ``report.*``,
    tag ``eval_run_id``: the evaluation it shows, artifact: the page)."""
    data_dir, image_root, train_dir, eval_dir, out = map(Path, (data_dir, image_root, train_dir, eval_dir, out))
    figures_dir = Path(figures_dir) if figures_dir else out.parent / "figures"
    inputs = _inputs(data_dir, train_dir, eval_dir)
    parent = tracking.Run.existing(inputs["run"]["run_id"], train_dir / "run.json")
    info = parent.stored
    later = []  # the launch tags of the stages after training, for the reproduce command
    if inputs["eval_run"]:
        later.append(tracking.Run.existing(inputs["eval_run"]["run_id"], eval_dir / "run.json",
                                           stage="evaluate").stored.data.tags)
    later.append({"stage": "report", **tracking.launch_tags(cfg)})
    mlflow = {"experiment_id": info.info.experiment_id, "run_name": info.info.run_name or parent.run_id,
              "tags": info.data.tags, "later_tags": tuple(later)}
    try:
        comparison = tracking.comparison(inputs["run"]["experiment"])
    except DetpipeError as exc:  # e.g. no evaluated training in the store yet: the page says so
        comparison = str(exc)
    page, figures = build_report(cfg, inputs, image_root, mlflow, comparison)
    with atomic_dir(figures_dir) as tmp:
        for name, data in figures.items():
            (tmp / name).write_bytes(data)
    write_text(out, page)
    evaluation = {"eval_run_id": inputs["eval_run"]["run_id"]} if inputs["eval_run"] else {}
    child = parent.child("report", tags={"stage": "report", "git_commit": tracking.git_commit(), **evaluation,
                                         **tracking.launch_tags(cfg)})
    try:
        child.log_params(config.flatten({"report": config.dict_of(cfg.report)}))
        child.log_artifact(out)
    except BaseException:
        child.end("FAILED")
        raise
    child.end()
    print(f"report -> {out} (figures: {figures_dir})", file=sys.stderr)
