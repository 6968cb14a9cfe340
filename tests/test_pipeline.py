"""The pipeline table is the one source of truth: Snakemake and DVC read it, and its per-stage code lists
match what each stage really loads."""

import ast
import json
import subprocess
import sys

import pytest

from detpipe import config, models
from detpipe.pipeline import LAYERS, STAGES, dvc_yaml, module_file, param_values
from tests.conftest import BIN, ROOT

LIBRARY = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "detpipe").rglob("*.py"))


def module_name(path: str) -> str:
    """``detpipe/formats/coco.py`` -> ``formats.coco``; a package's ``__init__.py`` -> the package."""
    parts = path.removesuffix(".py").split("/")[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_dvc_yaml_is_generated_from_the_stage_table():
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), "run: python -m detpipe.pipeline > dvc.yaml"


def test_snakemake_runs_each_stage_with_the_dvc_command_and_a_log():
    """Each rule's shell is the dvc.yaml cmd (plus a tee into its log): the two tools cannot drift."""
    out = subprocess.run([BIN / "snakemake", "--cores", "1", "--dry-run", "--forceall", "--printshellcmds", "report"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name, stage in STAGES.items():
        assert f"{stage.cmd} 2>&1 | tee {stage.log}" in out, name
        assert f"rule {name}:" in out


def test_each_rule_asks_for_its_stages_resources_and_bad_params_stop_snakemake_up_front(tmp_path):
    """The rules' threads, memory, minutes and GPUs come from params/detpipe.yaml `resources`; a params file
    that does not validate stops Snakemake before any job, with the validation's one line."""
    out = subprocess.run([BIN / "snakemake", "--cores", "64", "--dry-run", "--forceall", "report"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    wanted = config.load(ROOT / "params/detpipe.yaml").resources
    for name in STAGES:
        block = out[out.index(f"rule {name}:"):]
        block = block[:block.index("\n\n")] if "\n\n" in block else block
        job = wanted[name]
        assert f"threads: {job['threads']}" in block or job["threads"] == 1, (name, block)
        for part in (f"runtime={job['runtime']}", f"gpu={job['gpus']}", f"mem_mb={job['mem_mb']}"):
            assert part in block, (name, part, block)
    for name in ("Snakefile", "workflow"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "params").mkdir()
    params = (ROOT / "params/detpipe.yaml").read_text().replace("device: auto", "device: cpu")
    (tmp_path / "params/detpipe.yaml").write_text(params.replace("train: {threads: 4, mem_mb: 16000, runtime: 240, "
                                                                 "gpus: 0}", "train: {gpus: 1}"))
    (tmp_path / "params/datasets.yaml").write_text((ROOT / "params/datasets.yaml").read_text())
    bad = subprocess.run([BIN / "snakemake", "--cores", "1", "--dry-run", "report"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert ("params/detpipe.yaml: resources.train.gpus asks the cluster for 1 GPU(s) but device is cpu"
            in bad.stdout + bad.stderr), bad.stdout + bad.stderr


@pytest.mark.parametrize("name", list(STAGES))
def test_each_cmd_names_its_inputs_and_outputs(name):
    """dvc.yaml reads as a map: every data input and output of a stage is in its command (or under a path there)."""
    stage = STAGES[name]
    paths = stage.args.values()
    for path in [*stage.deps, *stage.outs, *stage.metrics]:
        assert any(path == p or path.startswith(p + "/") for p in paths), (name, path)
    for path in paths:
        assert any(path == d or d.startswith(path + "/") for d in [*stage.deps, *stage.outs, *stage.metrics]), path


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_modules_are_exactly_what_the_stage_loads(name):
    """A fresh interpreter loads the stage script; the detpipe modules it loads are the table's list, no more, no
    less. Together with the no-local-imports test below, every module the stage can run is declared."""
    probe = (f"import runpy, sys, json; runpy.run_path({str(ROOT / STAGES[name].script)!r}, run_name='probe'); "
             "print(json.dumps(sorted(m for m in sys.modules if m == 'detpipe' or m.startswith('detpipe.'))))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = {module_file(m.removeprefix("detpipe").removeprefix(".")) for m in json.loads(out.stdout)}
    declared = set(STAGES[name].code) - {STAGES[name].script}
    assert loaded == declared, f"missing from the table: {sorted(loaded - declared)}; " \
                               f"declared but not loaded: {sorted(declared - loaded)}"


def imports_of(path: str) -> list[tuple[str, bool]]:
    """``(detpipe module, inside a function?)`` for each import of a detpipe module in ``path``."""
    tree = ast.parse((ROOT / path).read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "detpipe":
                base = child.module.removeprefix("detpipe").removeprefix(".")
                for alias in child.names:
                    sub = f"{base}.{alias.name}".lstrip(".")
                    is_module = (ROOT / module_file(sub)).is_file() and sub not in ("",)
                    found.append((sub if is_module else base, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name.removeprefix("detpipe").removeprefix("."), in_function)
                             for a in child.names if a.name.split(".")[0] == "detpipe")
            visit(child, nested)

    visit(tree, False)
    return found


def test_no_detpipe_import_hides_inside_a_function():
    """Function-local imports are for heavy third-party libraries only; a hidden detpipe import would escape the
    per-stage lists (and could hide an import cycle)."""
    hidden = [(path, m) for path in [*LIBRARY, *(s.script for s in STAGES.values())]
              for m, local in imports_of(path) if local]
    assert hidden == []
    assert "importlib.import_module" not in "".join((ROOT / p).read_text() for p in LIBRARY)


def test_layers_import_only_downward():
    """core < services (config, tracking) < stage modules < pipeline table; nothing imports upward."""
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    modules = {module_name(p) for p in LIBRARY} - {""}
    assert modules == set(layer_of), f"put every module in a layer: {sorted(modules ^ set(layer_of))}"
    upward = [(module_name(p), m) for p in LIBRARY if module_name(p) for m, _ in imports_of(p)
              if m and layer_of[m] > layer_of[module_name(p)]]
    assert upward == []
    assert "pipeline" not in {m for s in STAGES.values() for m in s.modules}


def test_config_lists_the_models_that_models_builds():
    assert config.ARCHITECTURES == models.ARCHITECTURES and config.BACKBONES == models.BACKBONES
    assert config.ONE_STAGE == models.ONE_STAGE


def test_param_values_select_keys():
    values = param_values("train", ROOT)
    assert set(values["params/detpipe.yaml"]) == {"preset", "experiment", "seed", "device", "threads", "model", "train",
                                                  "evaluate.backend"}
    assert values["params/detpipe.yaml"]["evaluate.backend"] == "ultrafast"  # a dotted key reads the nested value
    assert set(values) == {"params/detpipe.yaml", "params/presets/balloon_mask_rcnn.yaml",
                           "params/presets/kitti_tiny_faster_rcnn.yaml"}


def test_snakemake_lint_is_clean():
    out = subprocess.run([BIN / "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "Congratulations" in out.stdout + out.stderr, out.stdout + out.stderr


HEAVY = {"torch", "torchvision", "pycocotools", "ultrafast_pycocotools", "matplotlib", "mlflow", "cv2"}


def test_function_local_imports_are_only_for_heavy_libraries():
    """Deferred imports keep --help and Snakemake's DAG quick; anything light is imported at the top."""
    local = []
    for path in LIBRARY:
        for fn in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                    local += [(path, n) for n in names if n.split(".")[0] not in HEAVY]
    assert local == []
