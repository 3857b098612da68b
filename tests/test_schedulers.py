"""`infer --shard auto` on cluster schedulers: the SLURM and Kubernetes examples run end to end.

examples/slurm/infer-array.sh runs as written, with a stand-in `sbatch` that runs each job at
once (each array task with the SLURM_ARRAY_* variables SLURM sets); the Indexed Job of
examples/kubernetes/infer-job.yaml runs its container command once per index with the Job's
env and JOB_COMPLETION_INDEX, then the merge Job's command. Both must give what one unsharded
run gives. `shard_from_env` is checked on hand-worked cases, and `--shard auto` without a
scheduler stops with one line.
"""

from __future__ import annotations

import csv
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_infer import models  # noqa: F401  (the tiny joint/seg/cls model folders)
from typer.testing import CliRunner

from dermtool.cli import app
from dermtool.errors import InputError
from dermtool.shards import shard_from_env
from dermtool.synthetic import make_lesion

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCHEDULER_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT",
                  "SLURM_ARRAY_TASK_STEP", "JOB_COMPLETION_INDEX", "DERMTOOL_SHARDS")
runner = CliRunner()

#: sbatch as a test double: logs its arguments, runs the job at once instead of queueing it
#: (an array task by task, with the variables SLURM sets), prints a job id as --parsable does.
FAKE_SBATCH = r'''#!{python}
import os, re, subprocess, sys
args = sys.argv[1:]
log = open(os.environ["SBATCH_LOG"], "a")
log.write("sbatch " + " ".join(args) + "\n")
if "--wrap" in args:
    code = subprocess.run(["bash", "-c", args[args.index("--wrap") + 1]], stdout=log, stderr=log).returncode
    log.write(f"merge exit {code}\n")
    print("200")
    sys.exit(0)
first = next(i for i, a in enumerate(args) if not a.startswith("--"))
script, script_args = args[first], args[first + 1:]
lo, hi = map(int, re.search(r"^#SBATCH --array=(\d+)-(\d+)$", open(script).read(), re.M).groups())
for task in range(lo, hi + 1):
    env = dict(os.environ, SLURM_ARRAY_JOB_ID="100", SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN=str(lo),
               SLURM_ARRAY_TASK_MAX=str(hi), SLURM_ARRAY_TASK_COUNT=str(hi - lo + 1))
    code = subprocess.run(["bash", script, *script_args], env=env, stdout=log, stderr=log).returncode
    log.write(f"task {task} exit {code}\n")
print("100")
'''


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> dict:  # noqa: F811
    """Six synthetic images and one unsharded infer run over them."""
    root = tmp_path_factory.mktemp("schedulers")
    images = root / "images"
    images.mkdir()
    for k in range(6):
        rgb = make_lesion(60 + 9 * k, 90 - 5 * k, np.random.default_rng(40 + k), cls=k % 3)[0]
        Image.fromarray(rgb).save(images / f"ISIC_{k:07d}.png")
    out = root / "one_run"
    result = runner.invoke(app, ["infer", str(images), "--out", str(out), "--model", str(models["joint"])])
    assert result.exit_code == 0, result.output
    return {"images": images, "out": out}


@pytest.fixture
def shell_env(tmp_path) -> dict:
    """An environment whose `dermtool` (and `sbatch`) are this checkout's, with no scheduler set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "dermtool", f'#!/bin/sh\nexec "{sys.executable}" -m dermtool "$@"\n')
    _executable(bin_dir / "sbatch", FAKE_SBATCH.replace("{python}", sys.executable))
    env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["SBATCH_LOG"] = str(tmp_path / "sbatch.log")
    return env


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def assert_same_as_one_run(out: Path, reference: dict, parts: int) -> None:
    for k in range(1, parts + 1):
        assert (out / f"predictions.part-{k}-of-{parts}.csv").is_file()
    merged, one = _rows(out / "predictions.csv"), _rows(reference["out"] / "predictions.csv")
    assert merged == one and len(merged) == 7  # header and the six images, in id order
    for row in one[1:]:
        name = f"{row[0]}_segmentation.png"
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference["out"] / name)))


def test_slurm_array_example_then_merge_equals_one_run(models, reference, shell_env, tmp_path):  # noqa: F811
    script = tmp_path / "infer-array.sh"
    text = (EXAMPLES / "slurm" / "infer-array.sh").read_text()
    assert "#SBATCH --array=0-3\n" in text
    # two tasks numbered 3 and 4: --shard auto must count from SLURM_ARRAY_TASK_MIN
    script.write_text(text.replace("#SBATCH --array=0-3\n", "#SBATCH --array=3-4\n"))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script), str(reference["images"]), str(out), "--model", str(models["joint"])],
                          env=shell_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "sbatch.log").read_text()
    assert proc.returncode == 0, proc.stderr + log
    assert "submitted job array 100" in proc.stdout and "job 200" in proc.stdout
    assert "task 3 exit 0" in log and "task 4 exit 0" in log and "merge exit 0" in log, log
    assert "--dependency=afterany:100" in log  # the merge waits for the whole array
    assert "shard 1/2 (SLURM_ARRAY_TASK_ID=3" in log and "shard 2/2 (SLURM_ARRAY_TASK_ID=4" in log
    assert_same_as_one_run(out, reference, 2)


def test_kubernetes_indexed_job_example_then_merge_equals_one_run(models, reference, shell_env, tmp_path):  # noqa: F811
    docs = list(yaml.safe_load_all((EXAMPLES / "kubernetes" / "infer-job.yaml").read_text()))
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    infer_job = next(d for d in docs if d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed")
    merge_job = next(d for d in docs if d["kind"] == "Job" and d is not infer_job)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    parts = infer_job["spec"]["completions"]
    container = infer_job["spec"]["template"]["spec"]["containers"][0]
    job_env = {e["name"]: e["value"] for e in container["env"]}
    assert int(job_env["DERMTOOL_SHARDS"]) == parts == 4
    for job in (infer_job, merge_job):
        pod = job["spec"]["template"]["spec"]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"

    data = tmp_path / "data"  # the volume, mounted at /data in every pod
    shutil.copytree(reference["images"], data / "images")

    def command(c: dict) -> list[str]:
        return [part.replace("/data", str(data)) for part in c["command"] + c.get("args", [])]

    # run with 2 parts, not the example's 4: the same code path at half the model loads
    job_env.update(DERMTOOL_SHARDS="2", INFER_OPTIONS=f"--model {models['joint']}")
    for index in range(2):
        proc = subprocess.run(command(container), env={**shell_env, **job_env, "JOB_COMPLETION_INDEX": str(index)},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert f"shard {index + 1}/2 (JOB_COMPLETION_INDEX={index} of DERMTOOL_SHARDS=2)" in proc.stderr
    proc = subprocess.run(command(merge_job["spec"]["template"]["spec"]["containers"][0]), env=shell_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert_same_as_one_run(data / "out", reference, 2)


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4"}, (1, 4)),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}, (3, 3)),
    # --array=10-16:3 is tasks 10, 13, 16: task 13 is the second of three
    ({"SLURM_ARRAY_TASK_ID": "13", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3",
      "SLURM_ARRAY_TASK_STEP": "3"}, (2, 3)),
    ({"JOB_COMPLETION_INDEX": "0", "DERMTOOL_SHARDS": "5"}, (1, 5)),
    ({"JOB_COMPLETION_INDEX": "4", "DERMTOOL_SHARDS": "5"}, (5, 5)),
])
def test_shard_from_env(env, expected):
    assert shard_from_env(env)[0] == expected


@pytest.mark.parametrize("env, words", [
    ({}, "neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set"),
    ({"JOB_COMPLETION_INDEX": "1"}, "DERMTOOL_SHARDS is not"),
    ({"JOB_COMPLETION_INDEX": "5", "DERMTOOL_SHARDS": "5"}, "not part 1..5"),
    # --array=1,5,9: three tasks, but 9 - 1 is no position among three
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}, "not part 1..3"),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "", "SLURM_ARRAY_TASK_COUNT": "3"},
     "SLURM_ARRAY_TASK_MIN='' is not a whole number"),
])
def test_shard_from_env_refuses(env, words):
    with pytest.raises(InputError, match=words.replace(".", r"\.")):
        shard_from_env(env)


def test_shard_auto_without_a_scheduler_exits_2_with_one_line(models, reference, tmp_path, monkeypatch):  # noqa: F811
    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["infer", str(reference["images"]), "--out", str(tmp_path / "out"),
                                 "--model", str(models["joint"]), "--shard", "auto"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--shard auto" in lines[0] and "give --shard K/N" in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_a_lone_array_task_beside_the_parts_of_a_sharded_run_is_refused(models, reference, tmp_path, monkeypatch):  # noqa: F811
    """`sbatch --array=2` alone is an array of one task, part 1 of 1: it redid the whole folder
    into OUT beside the parts, and the merge still failed."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(reference["images"]), "--out", str(out), "--model", str(models["joint"]),
                                 "--shard", "1/4"])
    assert result.exit_code == 0, result.output
    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")
    before = sorted(p.name for p in out.iterdir())
    result = runner.invoke(app, ["infer", str(reference["images"]), "--out", str(out), "--model", str(models["joint"]),
                                 "--shard", "auto", "--resume"])
    assert result.exit_code == 2 and "resubmit the whole array" in " ".join(result.output.split())
    assert sorted(p.name for p in out.iterdir()) == before


def test_sigterm_is_ctrl_c_in_the_command_and_the_default_stop_in_a_forked_worker(monkeypatch):
    """A scheduler stops a job with SIGTERM: the command cleans up as after Ctrl-C, while a
    forked batch worker still dies at once (its pool stops it with SIGTERM)."""
    import signal
    import time

    import dermtool.cli as cli

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_MAIN_PID", os.getpid())
    signal.signal(signal.SIGTERM, cli._terminated)
    try:
        pid = os.fork()
        if pid == 0:  # the worker: sleeps until stopped
            time.sleep(30)
            os._exit(0)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
