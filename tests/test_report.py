"""The report stage's page and figures, from generated inputs (benchmarks/bench_report.make_project: a synthetic
val set, predictions scored by the evaluate stage's functions, training logs, an MLflow store with two runs)."""

import base64
import io
import json
import shlex
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.bench_report import make_project
from detpipe import config, report, visualize
from detpipe.errors import DetpipeError
from tests.browser import Browser, chromium_path
from tests.conftest import ROOT, sh


def build(root, **overrides):
    cfg = config.load(ROOT / "params/detpipe.yaml", [f"{k}={v}" for k, v in overrides.items()])
    report.run(cfg, root / "data/coco", root / "data/raw", root / "runs/train", root / "runs/eval",
               root / "reports/index.html", root / "reports/figures")
    return (root / "reports/index.html").read_text()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Generated inputs (12 val images, masks) and the report built from them: ``(root, made, page)``."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        made = make_project(root, num_val=12, num_train=8, image_size=96)
        page = build(root, **{"report.num_samples": 3})
    return root, made, page


def test_the_page_has_every_section_and_the_run_s_numbers(project):
    root, made, page = project
    metrics, earlier = made["metrics"], made["earlier_metrics"]
    for section in ("headline", "dataset", "training", "evaluation", "provenance", "runs"):
        assert f'<section id="{section}">' in page
    assert f"<b>{metrics['bbox_mAP']:.3f}</b>" in page and f"<b>{metrics['segm_mAP']:.3f}</b>" in page
    assert f"{metrics['bbox_mAP'] - earlier['bbox_mAP']:+.3f}</span>" in page  # against the earlier run
    assert made["earlier_run_id"][:8] in page and made["run_id"] in page
    run = json.loads((root / "runs/train/run.json").read_text())
    # the report's own --set override is part of how the page was made
    assert f"git checkout {run['git_commit']}\ndvc exp run -S params/detpipe.yaml:++report.num_samples=3" in page
    assert run["data_hash"] in page and run["raw_data_hash"] in page
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}" in page
    assert "?workflowType=machine_learning" in page  # the MLflow link that lands on the runs table
    for name in ("circle", "square", "triangle", "cross"):
        assert f"<td>{name}</td>" in page
    assert page.count("(this run)") == 1


def test_every_figure_file_is_inlined_in_the_page(project):
    root, _, page = project
    files = sorted((root / "reports/figures").iterdir())
    names = {p.name for p in files}
    assert {"training.png", "box_sizes.png", "pr_curves.png", "confusion.png"} <= names
    assert {"ground_truth_1.jpg", "ground_truth_3.jpg", "worst_1.jpg"} <= names
    for path in files:
        mime = "image/png" if path.suffix == ".png" else "image/jpeg"
        assert f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}" in page, path.name
        Image.open(path).verify()
    assert page.count("<img ") == len(files)
    assert "src=\"http" not in page and "<script" not in page  # self-contained


def test_a_damaged_new_input_is_a_one_line_error_and_nothing_is_written(project, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(project[0], root, ignore=shutil.ignore_patterns("reports"))
    cases = [
        (lambda: (root / "runs/eval/analysis.json").unlink(), "runs/eval/analysis.json: error analysis is missing"),
        (lambda: (root / "runs/eval/analysis.json").write_text("{}"), "error analysis has no key 'per_class'"),
        (lambda: (root / "runs/train/iter_log.csv").write_text("epoch,loss\n1,2.0\n"),
         "runs/train/iter_log.csv: iteration log has no rows with the columns epoch, iter, lr, loss"),
        (lambda: (root / "runs/eval/plots/pr_curves.csv").unlink(),
         "runs/eval/plots/pr_curves.csv: precision-recall curves is missing"),
        (lambda: (root / "data/coco/train.json").write_text("[1"), "data/coco/train.json:1: malformed JSON"),
    ]
    for damage, message in cases:
        saved = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".csv")}
        damage()
        with pytest.raises(DetpipeError) as err:
            build(root)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert not (root / "reports").exists()
        for path, data in saved.items():
            path.write_bytes(data)


def test_the_best_other_run_is_the_comparison_s_first_evaluated_other_row():
    rows = [{"run": "a", "run_id": "A", "bbox_mAP": 0.5}, {"run": "b", "run_id": "B", "bbox_mAP": None},
            {"run": "c", "run_id": "C", "bbox_mAP": 0.3}]
    assert report.best_other_run(rows, "A")["run"] == "c"  # B has no evaluation
    assert report.best_other_run(rows, "C")["run"] == "a"
    assert report.best_other_run(rows[:1], "A") is None
    page = report.headline({"bbox_mAP": 0.4, "bbox_mAP_50": 0.6, "bbox_mAP_75": 0.2, "num_images": 3,
                            "num_detections": 9}, rows, "C")
    assert '<span class="delta down">-0.100</span>' in page and "bbox_mAP_50<" in page
    assert "nothing to compare with" in report.headline({"bbox_mAP": 0.4, "bbox_mAP_50": 0.6, "bbox_mAP_75": 0.2,
                                                         "num_images": 3, "num_detections": 9}, rows[:1], "A")
    # only runs on the same data compare: another dataset (or split) has another val set
    rows = [{**r, "data_hash": h} for r, h in zip(rows, ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "bbbbbbbbbbbb"))]
    assert report.best_other_run(rows, "C", "bbbbbbbbbbbb" + "c" * 52) is None
    assert report.best_other_run(rows, "C")["run"] == "a"
    page = report.headline({"bbox_mAP": 0.4, "bbox_mAP_50": 0.6, "bbox_mAP_75": 0.2, "num_images": 3,
                            "num_detections": 9}, rows, "C", "bbbbbbbbbbbb" + "c" * 52)
    assert "delta" not in page and "on the same data has been evaluated yet: nothing to compare with" in page
    page = report.headline({"bbox_mAP": 0.4, "bbox_mAP_50": 0.6, "bbox_mAP_75": 0.2, "num_images": 3,
                            "num_detections": 9}, rows, "C", "aaaaaaaaaaaa" + "c" * 52)
    assert '<span class="delta down">-0.100</span>' in page and "experiment on the same data" in page


def test_the_reproduce_command_follows_the_launcher():
    sha = "ab" * 20
    assert report.reproduce_command(sha, {"launcher": "snakemake"}) == f"git checkout {sha}\nsnakemake --cores 1 report"
    assert report.reproduce_command(sha, {"launcher": "dvc exp run", "dvc_exp_name": "lr-sweep"}).splitlines() == [
        f"git checkout {sha}", "dvc exp apply lr-sweep", "dvc repro"]
    dirty = report.reproduce_command(sha + "-dirty", {"launcher": "dvc repro"}).splitlines()
    assert dirty[0].startswith("# the run had uncommitted changes") and dirty[1:] == [f"git checkout {sha}",
                                                                                     "dvc repro"]
    elsewhere = report.reproduce_command(sha + "-dirty", {"launcher": "manual"}, config_file="/tmp/t/config.yaml")
    assert elsewhere.splitlines()[0].endswith("the resolved params are /tmp/t/config.yaml")
    empty = report.reproduce_command(sha, {"launcher": "manual", "overrides": "train.load_from="})
    assert empty.splitlines()[-1] == """dvc exp run -S 'params/detpipe.yaml:++train.load_from=""'"""  # as --set read it
    # --set overrides and another params file become dvc exp run -S '...:++KEY=VALUE', values in Hydra's grammar
    train = {"launcher": "manual", "overrides": shlex.join(["train.lr=0.02", "experiment=a=b, c", "train.lr=0.03",
                                                            "train.milestones=[8, 11]", "model.weights=null"])}
    evaluation = {"stage": "evaluate", "launcher": "manual", "overrides": "evaluate.score_thr=0.3 device=cpu"}
    trained = {"device": "cpu", "train": {"lr": 0.03}}
    lines = report.reproduce_command(sha, train, (evaluation, {"stage": "report", "launcher": "manual"}), trained)
    sets = ["params/detpipe.yaml:++train.lr=0.03", 'params/detpipe.yaml:++experiment="a=b, c"',
            "params/detpipe.yaml:++train.milestones=[8,11]", "params/detpipe.yaml:++model.weights=null",
            "params/detpipe.yaml:++evaluate.score_thr=0.3", 'params/detpipe.yaml:++device="cpu"']
    assert lines.splitlines() == [f"git checkout {sha}",
                                  "dvc exp run " + " ".join(f"-S {shlex.quote(s)}" for s in sets)]
    # a later stage's value of a key training read too would change the training: named, not applied
    lines = report.reproduce_command(sha, train, (evaluation,), {**trained, "device": "cuda"}).splitlines()
    assert lines[1] == "# evaluate ran with --set device=cpu; training read device too, so it is not applied"
    assert "device" not in lines[-1] and "evaluate.score_thr=0.3" in lines[-1]
    other = report.reproduce_command(sha, {"launcher": "snakemake", "params_file": "params/big.yaml"},
                                     ({"stage": "evaluate", "params_file": "params/small.yaml"},)).splitlines()
    assert other == [f"git checkout {sha}",
                     "# evaluate read params/small.yaml, training params/big.yaml: not applied",
                     "cp params/big.yaml params/detpipe.yaml  # the params file training read", "dvc exp run"]
    other = report.reproduce_command(sha, {"launcher": "manual", "params_file": "params/big.yaml"},
                                     ({"stage": "evaluate"},)).splitlines()
    assert other[1] == "# evaluate read params/detpipe.yaml, training params/big.yaml: not applied"
    experiment = report.reproduce_command(sha, {"launcher": "dvc exp run", "dvc_exp_name": "lr-sweep"},
                                          ({"stage": "evaluate", "overrides": "evaluate.score_thr=0.3"},))
    assert experiment.splitlines() == [f"git checkout {sha}", "# stages after training ran by hand with --set "
                                       "evaluate.score_thr=0.3: not part of the experiment",
                                       "dvc exp apply lr-sweep", "dvc repro"]


@pytest.mark.slow
def test_the_reproduce_command_s_dvc_settings_give_the_values_the_overrides_gave(tmp_path):
    """The real `dvc exp run -S` of the command writes into params/detpipe.yaml what detpipe's --set read: values
    with '=', ',' and spaces, lists, null, and keys the file leaves to their defaults."""
    overrides = ["train.lr=0.03", "experiment=a=b, c", "train.milestones=[8, 11]", "model.weights=\"\"",
                 "train.processes=1", "train.amp_dtype=float16", "report.score_thr=1e-3", "train.hflip=0"]
    command = report.reproduce_command("ab" * 20, {"launcher": "manual", "overrides": shlex.join(overrides)})
    run_line = command.splitlines()[-1]
    assert run_line.startswith("dvc exp run -S ")
    (tmp_path / "params").mkdir()
    shutil.copy(ROOT / "params/detpipe.yaml", tmp_path / "params/detpipe.yaml")
    shutil.copy(ROOT / "params/datasets.yaml", tmp_path / "params/datasets.yaml")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: cp params/detpipe.yaml used.yaml\n"
                                       "    params: [{params/detpipe.yaml: [experiment, train, model, report]}]\n"
                                       "    outs: [used.yaml]\n")
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "params")
    sh(tmp_path, "bash", "-c", run_line)
    written = config.load(tmp_path / "used.yaml", datasets=tmp_path / "params/datasets.yaml")
    expected = config.load(ROOT / "params/detpipe.yaml", overrides)
    for item in overrides:
        key = item.partition("=")[0]
        assert config.dotted(written, key) == config.dotted(expected, key), key


def test_training_chart_skips_epochs_that_were_not_validated_and_draws_iteration_components():
    epochs = [{"epoch": "1", "train/lr": "0.01", "train/loss": "2.0", "train/loss_classifier": "1.2",
               "val/bbox_mAP": ""},
              {"epoch": "2", "train/lr": "0.01", "train/loss": "1.5", "train/loss_classifier": "0.9",
               "val/bbox_mAP": "0.25"}]
    iterations = [{"epoch": str(1 + i // 3), "iter": str(i + 1), "lr": "0.01", "loss": str(2 - i / 10)}
                  for i in range(6)]
    with_components = [{**r, "loss_classifier": "0.5"} for r in iterations]
    for rows in (iterations, with_components):
        image = Image.open(io.BytesIO(visualize.training_chart(rows, epochs)))
        assert image.format == "PNG" and image.width > 3 * image.height


def test_a_marked_box_is_drawn_in_red_on_top():
    image = Image.new("RGB", (40, 40), "white")
    out = visualize.draw(image, [[10, 20, 30, 35], [10, 20, 30, 35]], [0, 1], ["a", "b"], marks=[None, "FP"], scale=2)
    assert out.size == (80, 80)
    assert out.getpixel((40, 69)) == visualize.MARK  # the bottom edge, scaled, of the marked box over the other


@pytest.mark.slow
def test_the_report_in_a_real_browser(project):
    """Opened as a user opens it (file://, a laptop-sized window): every image loads, no console error, nothing
    wider than the window, and a screenshot shows something."""
    root, _, _ = project
    with Browser(chromium_path()) as browser:
        browser.open((root / "reports/index.html").as_uri())
        images = browser.evaluate("[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        too_wide = browser.evaluate("""[...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > innerWidth + 0.5)
            .map(e => e.tagName + ' ' + e.className + ' ' + (e.innerText || '').slice(0, 40))""")
        widths = browser.evaluate("[document.documentElement.scrollWidth, innerWidth]")
        browser.evaluate("document.getElementById('evaluation').scrollIntoView()")
        shot = Image.open(io.BytesIO(browser.screenshot())).convert("L")
        errors = browser.errors
    assert len(images) == len(list((root / "reports/figures").iterdir()))
    assert all(ok for _, ok in images), [alt for alt, ok in images if not ok]
    assert errors == []
    assert too_wide == [] and widths[0] <= widths[1]
    pixels = np.asarray(shot)
    assert shot.size == (1366, 768) and pixels.std() > 20 and (pixels < 128).mean() > 0.01  # not a blank page


@pytest.mark.slow
def test_snakemake_s_own_report_holds_the_page_and_its_figures(pipeline_repo, tmp_path):
    """The report rule marks its outputs with report(): `snakemake --report` after a run collects them."""
    repo, _ = pipeline_repo
    out = tmp_path / "report.zip"  # a .zip keeps each file as it is, so the test can list them
    sh(repo, "snakemake", "--cores", "1", "--report", str(out))
    with zipfile.ZipFile(out) as z:
        names = {Path(n).name for n in z.namelist()}
    figures = {p.name for p in (repo / "reports/figures").iterdir() if not p.name.startswith(".")}  # no marker
    assert {"training.png", "pr_curves.png", "confusion.png", "box_sizes.png"} <= figures
    assert figures | {"index.html"} <= names
