import subprocess

from tests.conftest import BIN, ROOT


def test_ruff_clean_on_all_project_python():
    result = subprocess.run([BIN / "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_ruff_covers_workflow_and_benchmarks():
    files = subprocess.run([BIN / "ruff", "check", "--show-files", "."], cwd=ROOT, capture_output=True,
                           text=True).stdout
    for path in ("workflow/formats/kitti_tiny_tutorial.py", "benchmarks/bench_default.py", "stages/train.py",
                 "detpipe/engine.py", "tests/test_pipeline.py"):
        assert f"{ROOT}/{path}" in files, path
    assert "/.venv/" not in files
