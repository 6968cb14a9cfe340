import subprocess

from tests.conftest import BIN, ROOT


def test_ruff_clean():
    result = subprocess.run([BIN / "ruff", "check", "detpipe", "stages", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
