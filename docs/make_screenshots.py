"""Remake docs/report.png and docs/score.png: the two pages, from the synthetic examples only.

Runs the bundled model over examples/synthetic (never ISIC images: they may not be
redistributed), scores it against the examples' truth, and photographs both pages with headless
Chromium; the PNGs are reduced to a 256-colour palette so they stay small in the repository.

    python docs/make_screenshots.py          # needs dermtool installed and Debian's chromium
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "synthetic"


def dermtool(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "dermtool", *args], check=True, cwd=cwd)


def screenshot(page: Path, png: Path, height: int, work: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found (Debian: apt-get install chromium)")
    raw = work / f"{png.stem}_raw.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={work / 'profile'}", "--force-device-scale-factor=1",
                    f"--window-size=1200,{height}", f"--screenshot={raw}", page.as_uri()],
                   check=True, capture_output=True)
    with Image.open(raw) as img:
        img.convert("RGB").quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(png, optimize=True)
    print(f"{png.relative_to(ROOT)}: {png.stat().st_size // 1024} KiB")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dermtool_screens_") as tmp:
        work = Path(tmp)
        (work / "examples").symlink_to(ROOT / "examples")  # short relative paths on the pages
        ex = "examples/synthetic"
        dermtool("infer", f"{ex}/images", "--out", "examples-run", "--report", cwd=work)
        dermtool("score", "examples-run/predictions.csv", f"{ex}/labels.csv", "--pred-masks", "examples-run",
                 "--truth-masks", f"{ex}/masks", "--bootstrap", "1000", "--plots", "examples-score",
                 "--images", f"{ex}/images", cwd=work)
        out, plots = work / "examples-run", work / "examples-score"
        screenshot(out / "report.html", ROOT / "docs" / "report.png", 960, work)
        screenshot(plots / "score.html", ROOT / "docs" / "score.png", 1700, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
