"""Terminal reports (rich) shared by the commands."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)


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
    checks = [
        ("unreadable / truncated files (skipped)", report.failed),
        ("duplicate image ids (second skipped)", report.duplicate_ids),
        ("images without a mask", report.no_mask),
        ("images without a label", report.no_label),
        ("mask size differs from its image (rescaled)", report.mask_size_mismatch),
        ("mask not binary (binarised at > 128)", report.mask_nonbinary),
        ("mask empty after binarising at > 128 (0/1 values?)", report.mask_empty),
        ("label rows with melanoma = seborrheic_keratosis = 1", report.both_labels),
    ]
    for name, items in checks:
        shown = ", ".join(Path(i[0]).name if isinstance(i, tuple) else str(i) for i in items[:3])
        table.add_row(name, str(len(items)), escape(shown) + (" ..." if len(items) > 3 else ""))
    console.print(table)
    for source, message in report.failed:
        # soft_wrap: a file name broken over two lines cannot be copied back into a shell
        console.print(f"[red]skipped[/] {escape(message)}", highlight=False, soft_wrap=True)
