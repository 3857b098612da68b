"""Terminal reports (rich) shared by the commands."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from dermtool.terminal import Console

console = Console(stderr=True)

#: The data check of `dermtool preprocess`: CacheReport field -> what it means, as printed.
CHECK_TITLES = {
    "failed": "unreadable / truncated files (skipped)",
    "duplicate_ids": "duplicate image ids (second skipped)",
    "no_mask": "images without a mask",
    "no_label": "images without a label",
    "labels_without_image": "label ids without an image",
    "mask_size_mismatch": "mask size differs from its image (rescaled)",
    "mask_zero_one": "mask stored as 0 and one value v other than 255, e.g. 0/1 (read as v = lesion)",
    "mask_nonbinary": "mask not binary (binarised at > 128)",
    "mask_empty": "mask empty after binarising at > 128",
    "mask_label_map": "mask is a label map (largest value 2-8, not just 0 and it; image kept without a mask)",
    "both_labels": "label rows with melanoma = seborrheic_keratosis = 1 (counted as melanoma)",
    "no_class_labels": "label rows with every class 0 beside a nevus column (left without a class)",
}


def failed_checks(report) -> str:
    """The checks that found something, as "title (count)", for `--strict`'s one-line error."""
    return "; ".join(f"{title} ({len(getattr(report, check))})"
                     for check, title in CHECK_TITLES.items() if getattr(report, check))


def print_cache_report(report, layout, out: Path) -> None:
    """Summary of `dermtool preprocess`: what was written and what the data check found."""
    if report.reused:
        console.print(f"[green]cache up to date[/]: {escape(str(out))} ({report.n_images} images, reused)",
                      soft_wrap=True)
        if not report.problems:
            return
    else:
        rate = report.n_images / report.seconds if report.seconds else 0.0
        console.print(f"[green]wrote[/] {escape(str(out))}: {report.n_images} images in "
                      f"{report.seconds:.1f} s ({rate:.1f} images/s)", soft_wrap=True)
    console.print(escape(f"  images: {layout.images}   masks: {layout.masks or '-'}   "
                         f"labels: {layout.labels or '-'}"), soft_wrap=True)
    table = Table(title="data check", show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("count", justify="right")
    table.add_column("examples")
    for check, name in CHECK_TITLES.items():
        items = getattr(report, check)
        shown = ", ".join(Path(i[0]).name if isinstance(i, tuple) else str(i) for i in items[:3])
        table.add_row(name, str(len(items)), escape(shown) + (" ..." if len(items) > 3 else ""))
    console.print(table)
    for source, message in report.failed:
        # soft_wrap: a file name broken over two lines cannot be copied back into a shell
        console.print(f"[red]skipped[/] {escape(message)}", highlight=False, soft_wrap=True)
