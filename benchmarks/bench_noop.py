"""Benchmark no-op reruns: ``dvc repro`` and ``snakemake --cores 1 report`` with nothing to do.

    nice -n 19 python -m benchmarks.bench_noop --json docs/bench_noop.json

In a scratch copy of this project, one complete run is recorded by both tools with every stage command
answered by tests/fake_stage.py (a ``python`` first on PATH that writes the stage's declared outputs), as
tests/test_reruns.py does; then each tool is run again with nothing to do, ``--runs`` times. The same is
done in a one-stage toy project (one input file copied to one output) made by this script, runs of the
two alternating so both see the same load. Printed: the median CPU seconds (the command and its children:
steady on a busy machine) and wall seconds of each, and the ratios project / toy (goal <= 1.5x).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from detpipe.files import write_json

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FOLDERS = ("detpipe", "stages", "params", "workflow", ".dvc", "tests")
FILES = ("Snakefile", "dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml")
GIT_ENV = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
TOY_SNAKEFILE = """rule all:
    input: "out.txt"

rule copy:
    input: "in.txt"
    output: "out.txt"
    shell: "cp {input} {output}"
"""
TOY_DVC = """stages:
  copy:
    cmd: cp in.txt out.txt
    deps:
    - in.txt
    outs:
    - out.txt
"""
COMMANDS = {"dvc": (["dvc", "repro"], ["dvc", "repro"]),  # (project, toy)
            "snakemake": (["snakemake", "--cores", "1", "report"], ["snakemake", "--cores", "1", "all"])}
NOTHING = {"dvc": "Data and pipelines are up to date", "snakemake": "Nothing to be done"}


def run(cwd: Path, cmd: list[str], env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout + result.stderr


def project(root: Path) -> tuple[Path, dict]:
    """A copy of this project where both tools have recorded a complete run of fake stages."""
    repo = root / "project"
    for name in FOLDERS:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    for name in FILES:
        shutil.copy(ROOT / name, repo / name)
    fake = root / "bin"
    fake.mkdir()
    (fake / "python").write_text(f"#!/bin/sh\nexec {BIN / 'python'} {repo / 'tests/fake_stage.py'} \"$@\"\n")
    (fake / "python").chmod(0o755)
    env = {**os.environ, **GIT_ENV, "PATH": f"{fake}:{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    run(repo, ["git", "init", "-q"], env)
    run(repo, ["snakemake", "--cores", "1", "report"], env)
    run(repo, ["dvc", "repro", "-q"], env)
    return repo, env


def toy(root: Path) -> tuple[Path, dict]:
    repo = root / "toy"
    repo.mkdir()
    (repo / "Snakefile").write_text(TOY_SNAKEFILE)
    (repo / "dvc.yaml").write_text(TOY_DVC)
    (repo / "in.txt").write_text("toy\n")
    env = {**os.environ, **GIT_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
    run(repo, ["git", "init", "-q"], env)
    run(repo, ["dvc", "init", "-q"], env)
    run(repo, ["dvc", "config", "core.analytics", "false"], env)
    run(repo, ["snakemake", "--cores", "1", "all"], env)
    run(repo, ["dvc", "repro", "-q"], env)
    return repo, env


def noop(tool: str, cwd: Path, env: dict, cmd: list[str]) -> tuple[float, float]:
    """CPU seconds (the command and its children) and wall seconds of one run, checked to have done nothing."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = run(cwd, cmd, env)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if NOTHING[tool] not in out:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} was not a no-op:\n{out[-2000:]}")
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-noop-") as tmp:
        places = {"project": project(Path(tmp)), "toy": toy(Path(tmp))}
        for tool, commands in COMMANDS.items():
            times = {where: [] for where in places}
            for i in range(args.runs + 1):  # alternating, so both see the same load; the first round warms up
                for (where, (cwd, env)), cmd in zip(places.items(), commands):
                    if i:
                        times[where].append(noop(tool, cwd, env, cmd))
                    else:
                        noop(tool, cwd, env, cmd)
            figures[tool] = {where: dict(zip(("cpu", "wall"), (round(statistics.median(v), 3) for v in zip(*ts))))
                             for where, ts in times.items()}
    print(f"\nmedian of {args.runs} no-op runs, seconds (CPU: the command and its children)\n")
    print("| command | project CPU | toy CPU | ratio CPU | project wall | toy wall | ratio wall |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for tool, f in figures.items():
        for k in ("cpu", "wall"):
            f[f"ratio_{k}"] = round(f["project"][k] / f["toy"][k], 3)
        print(f"| `{' '.join(COMMANDS[tool][0])}` | {f['project']['cpu']:.2f} | {f['toy']['cpu']:.2f} | "
              f"{f['ratio_cpu']:.2f}x | {f['project']['wall']:.2f} | {f['toy']['wall']:.2f} | {f['ratio_wall']:.2f}x |")
    print("goal: ratio <= 1.5x")
    if args.json:
        write_json(args.json, {"runs": args.runs, **figures})


if __name__ == "__main__":
    main()
