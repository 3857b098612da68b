"""What `infer --report` costs, and how heavy report.html gets for a large folder.

1. The real command on the same synthetic ~1024x768 JPEGs (made with dermtool.synthetic), with
   and without `--report`, alternated (plain, report, plain, report, ...) in one run so that a
   busy machine slows both alike; each run writes into a fresh folder, so every thumbnail is
   drawn. Reported: wall seconds of each command, and the ratio of the medians (the target is
   at most 1.10), plus the report's own seconds as the command prints them.
2. write_report on a folder of N predictions without images (default 10,000): seconds, size of
   report.html, and, where Chromium is installed, how long it takes to load and render page 1.

    python bench/report_bench.py                     # 200 images, 3 rounds, a 10,000-row page
    python bench/report_bench.py --images 500 --rounds 2 --rows 0
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_bench import helper  # noqa: E402  (same folder: the synthetic JPEG maker)


def time_infer(images: Path, out: Path, report: bool, batch_size: int) -> tuple[float, float, float | None]:
    """(wall seconds, CPU seconds, report seconds as printed) of one `dermtool infer` command.

    CPU seconds (user + system of the child, from os.wait4) are what the report adds to the
    machine's work, and move less than wall time when other jobs share the cores.
    """
    cmd = [sys.executable, "-m", "dermtool", "infer", str(images), "--out", str(out),
           "--batch-size", str(batch_size)] + (["--report"] if report else [])
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-800:]
    if proc.returncode not in (0, 1):
        raise SystemExit(f"dermtool infer exited with {proc.returncode}:\n{tail}")
    drawn = re.search(r"thumbnails drawn in ([0-9.]+) s", tail)
    return seconds, usage.ru_utime + usage.ru_stime, float(drawn.group(1)) if drawn else None


def big_page(rows: int, work: Path) -> None:
    """write_report on `rows` predictions (no images): time, page weight, browser render time."""
    import numpy as np

    from dermtool import CLASS_NAMES
    from dermtool.review import write_report

    out = work / "big"
    out.mkdir()
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=rows)
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", *CLASS_NAMES, "label"])
        w.writerows([f"ISIC_{i:07d}", *(f"{p:.6f}" for p in row), CLASS_NAMES[int(np.argmax(row))]]
                    for i, row in enumerate(probs))
    started = time.perf_counter()
    write_report(out)
    seconds = time.perf_counter() - started
    size = (out / "report.html").stat().st_size / 1024
    print(f"report.html for {rows} images: written in {seconds:.2f} s, {size:.0f} KiB")
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if chromium:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={work / 'profile'}",
               "--dump-dom", (out / "report.html").as_uri()]
        started = time.perf_counter()
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
        shown = dom.count('<figure class="entry')
        print(f"headless Chromium: page 1 rendered ({shown} entries in the DOM) "
              f"in {time.perf_counter() - started:.1f} s, browser start-up included")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="Synthetic images per infer run.")
    parser.add_argument("--distinct", type=int, default=40, help="Distinct synthetic images (the rest are copies).")
    parser.add_argument("--rounds", type=int, default=3, help="Pairs of runs (plain, --report).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=10000, help="Entries of the large page (0: skip).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dermtool_report_bench_") as tmp:
        work = Path(tmp)
        if args.images:
            print(f"making {args.images} synthetic ~1024x768 JPEGs ...", flush=True)
            images = Path(helper("synthetic", str(work / "images"), str(args.images), str(args.distinct)))
            time_infer(images, work / "warm_up", False, args.batch_size)  # file cache, imports: not timed
            shutil.rmtree(work / "warm_up")
            wall: dict[bool, list[float]] = {False: [], True: []}
            cpu: dict[bool, list[float]] = {False: [], True: []}
            report_seconds = []
            for r in range(args.rounds):
                for report in (False, True):
                    out = work / f"out_{r}_{int(report)}"
                    seconds, cpu_seconds, drawn = time_infer(images, out, report, args.batch_size)
                    wall[report].append(seconds)
                    cpu[report].append(cpu_seconds)
                    if drawn is not None:
                        report_seconds.append(drawn)
                    print(f"  round {r + 1}: {'--report' if report else 'plain   '} {seconds:6.1f} s wall, "
                          f"{cpu_seconds:6.1f} s CPU", flush=True)
                    shutil.rmtree(out)
            print(f"\n{args.images} images, medians of {args.rounds} rounds (target: ratio <= 1.10)")
            for name, values in (("wall", wall), ("CPU", cpu)):
                plain, with_report = statistics.median(values[False]), statistics.median(values[True])
                print(f"  {name:4s} plain {plain:6.1f} s   --report {with_report:6.1f} s   "
                      f"ratio {with_report / plain:.3f}")
            drawn = statistics.median(report_seconds)
            print(f"  the report itself: {drawn:.1f} s ({1000 * drawn / args.images:.1f} ms an image)")
        if args.rows:
            big_page(args.rows, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
