"""Figures of `dermtool score --plots DIR`, and DIR/score.html holding them with the tables.

Each figure has a `*_data` function returning exactly the numbers it draws, computed with the
scorer's own functions (dermtool.metrics, dermtool.score.class_arrays), so the tests check the
data and the figures cannot drift from the table. matplotlib draws through its Agg canvas
(no display, no pyplot state); contours on images come from dermtool.overlay, the drawing used
by `infer --overlay` and the infer report.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dermtool import CLASS_NAMES, metrics
from dermtool.errors import InputError
from dermtool.io import publish, staging_folder
from dermtool.overlay import CLASS_COLOURS, DISPLAY_NAMES, PRED_COLOUR, TRUTH_COLOUR

HIST_BINS = np.linspace(0.0, 1.0, 21)  # 0.05 wide: 0.65 falls on an edge
WORST_SHOWN = 12
TILE_SIDE = 360


def roc_data(y_true: np.ndarray, pred_probs: np.ndarray, class_names=CLASS_NAMES) -> dict[str, dict]:
    """Per class: {"fpr", "tpr", "auc"} of one-vs-all ROC; the AUC is the scorer's `roc_auc`.

    A class absent from the truth (or present in every row) has empty arrays and AUC nan.
    """
    out = {}
    for k, name in enumerate(class_names):
        positive = np.asarray(y_true) == k
        fpr, tpr, _ = metrics.roc_curve(positive, pred_probs[:, k])
        out[name] = {"fpr": fpr, "tpr": tpr, "auc": metrics.roc_auc(positive, pred_probs[:, k])}
    return out


def reliability_data(y_true: np.ndarray, pred_probs: np.ndarray, n_bins: int = metrics.ECE_BINS) -> dict[str, Any]:
    """Per equal-width bin of the top probability: its mean, the accuracy of the argmax and the
    count (`metrics.calibration_bins`), the bin edges, and the ECE the scorer reports."""
    return {**metrics.calibration_bins(pred_probs, y_true, n_bins), "edges": np.linspace(0.0, 1.0, n_bins + 1),
            "ece": metrics.expected_calibration_error(pred_probs, y_true, n_bins)}


def operating_point_data(cls: dict[str, Any]) -> tuple[float, float] | None:
    """(false positive rate, sensitivity) of melanoma at the label column's decision, if any."""
    decision = cls.get("decision")
    if decision is None:
        return None
    mel = decision["per_class"]["melanoma"]
    if mel["sensitivity"] is None or mel["specificity"] is None:
        return None
    return 1.0 - mel["specificity"], mel["sensitivity"]


def plot_reliability(data: dict[str, Any], path: Path) -> Path:
    """Accuracy of the argmax against its probability, per bin, with the diagonal of a calibrated model."""
    fig = _figure(5.6, 5.0)
    ax = fig.add_subplot()
    edges = data["edges"]
    shown = data["counts"] > 0
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--", label="calibrated")
    ax.bar(edges[:-1][shown], data["accuracy"][shown], width=np.diff(edges)[shown], align="edge",
           color="#4a7fb5", edgecolor="white", label="accuracy of the argmax")
    ax.plot(data["confidence"][shown], data["accuracy"][shown], "o", color="#1d2330", ms=4,
            label="(mean probability, accuracy) of a bin")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="top class probability", ylabel="accuracy",
           title=f"Reliability, ECE {data['ece']:.3f} ({len(edges) - 1} bins, {int(data['counts'].sum())} images)")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=9)
    fig.savefig(path)
    return path


def jaccard_histogram_data(per_image: dict[str, float]) -> dict[str, Any]:
    """Counts of per-image Jaccard in 0.05 bins, the mean and the share under the 0.65 line."""
    values = np.array(list(per_image.values()), dtype=np.float64)
    counts, edges = np.histogram(values, bins=HIST_BINS)
    return {"counts": counts, "edges": edges, "mean": float(values.mean()) if values.size else float("nan"),
            "below": float(np.mean(values < metrics.JAC_THRESHOLD)) if values.size else float("nan"),
            "threshold": metrics.JAC_THRESHOLD}


def worst_data(per_image: dict[str, float], n: int = WORST_SHOWN) -> list[tuple[str, float]]:
    """The `n` images with the lowest Jaccard, lowest first (ties by id, so the sheet is stable)."""
    return sorted(per_image.items(), key=lambda item: (item[1], item[0]))[:n]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _ci_text(ci) -> str:
    return "" if not ci or None in ci or any(np.isnan(ci)) else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _literal(legend):
    """The legend with its entries drawn as written: a class name's `$` starts no mathtext."""
    for text in legend.get_texts():
        text.set_parse_math(False)
    return legend


def _colour(name: str) -> tuple[float, float, float]:
    return tuple(c / 255 for c in CLASS_COLOURS.get(name, (0, 0, 0)))


def plot_roc(data: dict[str, dict], auc_ci: dict | None, path: Path,
             operating_point: tuple[float, float] | None = None) -> Path:
    """One figure, one ROC curve per class, its AUC (and 95 % interval) in the legend, and the
    melanoma decision of the label column (`operating_point_data`) as a marked point."""
    fig = _figure(5.6, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--", label="chance")
    for name, d in data.items():
        if d["fpr"].size == 0:
            continue
        label = f"{DISPLAY_NAMES.get(name, name)}: AUC {d['auc']:.3f}{_ci_text((auc_ci or {}).get(name))}"
        ax.plot(d["fpr"], d["tpr"], color=_colour(name), lw=2, label=label)
    if operating_point is not None:
        fpr, tpr = operating_point
        ax.plot([fpr], [tpr], "o", ms=9, mfc="white", mec=_colour("melanoma"), mew=2.5,
                label=f"melanoma decision: SE {tpr:.3f}, SP {1 - fpr:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 − specificity)",
           ylabel="true positive rate (sensitivity)", title="ROC, one class against the others")
    ax.set_aspect("equal")
    _literal(ax.legend(loc="lower right", fontsize=9))
    fig.savefig(path)
    return path


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> Path:
    """The confusion matrix, counts and row shares (true rows, predicted columns)."""
    cm = np.asarray(confusion, dtype=np.int64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _figure(5.6, 4.6)
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = [DISPLAY_NAMES.get(c, c).replace(" ", "\n") for c in classes]
    ax.set_xticks(range(len(classes)), names, parse_math=False)  # names as written: see plot_worst
    ax.set_yticks(range(len(classes)), names, parse_math=False)
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (count, share of the row)")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.55 else "black", fontsize=11)
    fig.savefig(path)
    return path


def plot_jaccard(data: dict[str, Any], jac_ci, path: Path) -> Path:
    """Histogram of per-image Jaccard with the 0.65 line and the mean (and its interval)."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    edges = data["edges"]
    ax.bar(edges[:-1], data["counts"], width=np.diff(edges), align="edge", color="#4a7fb5", edgecolor="white")
    ax.axvline(data["threshold"], color="#c0392b", lw=2,
               label=f"{data['threshold']} (ISIC 2018): {data['below']:.0%} of images below")
    ax.axvline(data["mean"], color="#1d2330", lw=1.5, ls="--",
               label=f"mean JAC {data['mean']:.3f}{_ci_text(jac_ci)}")
    if jac_ci and None not in jac_ci:
        ax.axvspan(jac_ci[0], jac_ci[1], color="#1d2330", alpha=0.12, lw=0)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlim=(0, 1), xlabel="Jaccard of the image", ylabel="images",
           title=f"Per-image Jaccard ({int(data['counts'].sum())} images)")
    ax.legend(loc="upper left", fontsize=9)
    fig.savefig(path)
    return path


def plot_worst(worst: list[tuple[str, float]], images: dict[str, Path], pred_masks: Path, truth_masks: Path,
               path: Path) -> Path | None:
    """A sheet of the worst-segmented images: truth (magenta) and prediction (green) contours."""
    from dermtool.io import find_masks, open_image
    from dermtool.overlay import draw_overlay, read_mask_at, thumbnail_size
    from dermtool.preprocess import load_image
    from dermtool.score import mask_ids_as_read

    truths = mask_ids_as_read(find_masks(Path(truth_masks)), truth_masks)  # found as score found them
    preds = mask_ids_as_read(find_masks(Path(pred_masks)), pred_masks)
    tiles, unreadable = [], 0
    for image_id, jac in worst:
        source, truth_path = images.get(image_id), truths.get(image_id)
        if source is None or truth_path is None:
            continue
        with open_image(truth_path) as m:
            width, height = m.size
        size = thumbnail_size(height, width, TILE_SIDE)
        try:
            pixels, _ = load_image(source, resize_to=size)
        except InputError:  # a thumbnail of a broken original is left out, as the infer report does
            unreadable += 1
            continue
        pred_path = preds.get(image_id)
        pred = read_mask_at(pred_path, size) if pred_path is not None else None
        tiles.append((image_id, jac, draw_overlay(pixels, pred, truth=read_mask_at(truth_path, size))))
    if not tiles:
        return None
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    fig = _figure(3.2 * cols, 2.7 * rows + 0.5)
    for i, (image_id, jac, img) in enumerate(tiles):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(img))
        # an id is a file name, shown as written: as mathtext "cost$5$" showed "cost5", "x$\qq$y"
        # failed the whole command, and "a\$b" lost its backslash
        ax.set_title(f"{image_id}\nJAC {jac:.3f}", fontsize=9, parse_math=False)
        ax.axis("off")
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], color=np.array(TRUTH_COLOUR) / 255, lw=3, label="truth"),
                        Line2D([], [], color=np.array(PRED_COLOUR) / 255, lw=3, label="prediction")],
               loc="outside lower center", ncols=2, fontsize=10)
    left_out = f" ({unreadable} unreadable left out)" if unreadable else ""
    fig.suptitle(f"The {len(tiles)} worst-segmented images{left_out}", fontsize=12)
    fig.savefig(path)
    return path


def write_plots(result: dict[str, Any], plots_dir: Path, pred_csv: Path | None = None,
                truth_csv: Path | None = None, pred_masks: Path | None = None, truth_masks: Path | None = None,
                images_dir: Path | None = None) -> Path:
    """Draw the figures of a `score()` result into `plots_dir` and write plots_dir/score.html.

    Args:
        result: what `dermtool.score.score` returned for these inputs.
        pred_csv, truth_csv: the scored CSVs (for the ROC curves; the result has only the AUCs).
        pred_masks, truth_masks, images_dir: for the sheet of worst-segmented images, drawn
            only when `images_dir` is given.

    Returns:
        the path of score.html.
    """
    final = Path(plots_dir)
    made = not final.exists()
    final.mkdir(parents=True, exist_ok=True)
    # drawn in a folder of its own, then moved in with score.html last: an interrupted or failed
    # run leaves no figures without their page (nor a page over another run's figures)
    plots_dir = staging_folder(final.resolve())
    try:
        _draw(result, plots_dir, pred_csv, truth_csv, pred_masks, truth_masks, images_dir)
        publish(plots_dir, final, last="score.html")
    except BaseException:
        shutil.rmtree(plots_dir, ignore_errors=True)
        if made:  # the folder this call made, empty again: not left behind
            try:
                final.rmdir()
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(plots_dir, ignore_errors=True)
    return final / "score.html"


def _draw(result: dict[str, Any], plots_dir: Path, pred_csv, truth_csv, pred_masks, truth_masks, images_dir) -> Path:
    """write_plots' figures and page, drawn into `plots_dir`."""
    from dermtool.pages import write_page
    from dermtool.score import class_arrays

    figures = []
    cls, seg = result.get("classification"), result.get("segmentation")
    if cls is not None and pred_csv is not None:
        _, y_true, pred_probs = class_arrays(pred_csv, truth_csv)
        figures.append(("ROC curves", plot_roc(roc_data(y_true, pred_probs), cls.get("auc_ci95"),
                                              plots_dir / "roc.png", operating_point_data(cls))))
        if cls.get("ece") is not None:  # rows that do not sum to 1 are scores, not probabilities
            figures.append(("Reliability diagram", plot_reliability(reliability_data(y_true, pred_probs),
                                                                    plots_dir / "reliability.png")))
        figures.append(("Confusion matrix", plot_confusion(cls["confusion"], cls["classes"],
                                                           plots_dir / "confusion.png")))
    worst = []
    if seg is not None:
        figures.append(("Per-image Jaccard", plot_jaccard(jaccard_histogram_data(seg["per_image"]),
                                                          seg.get("jac_ci95"), plots_dir / "jaccard.png")))
        worst = worst_data(seg["per_image"])
        if images_dir is not None and worst:
            from dermtool.data import find_images, image_id_of

            images = {image_id_of(p).strip(): p for p in find_images(Path(images_dir))}  # ids as score read them
            sheet = plot_worst(worst, images, pred_masks, truth_masks, plots_dir / "worst.png")
            if sheet is not None:
                figures.append(("Worst-segmented images", sheet))
    return write_page(plots_dir / "score.html", "score.html.j2", result=result, tables=_tables(result),
                      figures=[{"title": t, "file": p.name, "wide": p.name == "worst.png"} for t, p in figures],
                      worst=worst,
                      has_images=images_dir is not None, sources=_sources(pred_csv, truth_csv, pred_masks,
                                                                          truth_masks, images_dir))


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _tables(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the page, formatted: the template only lays them out."""
    seg, cls = result.get("segmentation"), result.get("classification")
    tables: dict[str, Any] = {"seg": None, "cls": None, "mean": _fmt(result.get("mean_performance"))}
    if seg is not None:
        tables["seg"] = [
            ("Jaccard (mean), JAC", _fmt(seg["jac"]), _ci_text(seg.get("jac_ci95")).strip()),
            ("Dice (mean)", _fmt(seg["dice"]), ""),
            ("thresholded Jaccard (ISIC 2018)", _fmt(seg["jac_thresholded"]), ""),
            ("images with Jaccard < 0.65", f"{seg['frac_below_065']:.1%}", ""),
            ("missing predictions (scored 0)", str(seg["n_missing"]), ""),
            ("empty predictions, lesion in truth", str(seg["n_empty_pred"]), ""),
            ("empty truth masks (no lesion)", str(seg.get("n_empty_truth", 0)), ""),
        ]
        if seg.get("n_zero_one_masks"):  # as the terminal table shows it
            tables["seg"].append(("masks stored as 0/v, e.g. 0/1 (read as v = lesion)", str(seg["n_zero_one_masks"]), ""))
    if cls is not None:
        auc_ci = cls.get("auc_ci95") or {}
        tables["cls"] = {
            "summary": f"BACC {_fmt(cls['bacc'])} {_ci_text(cls.get('bacc_ci95')).strip()}, "
                       f"accuracy {_fmt(cls['accuracy'])}, {cls['n_images']} images",
            "rows": [(DISPLAY_NAMES.get(name, name), _fmt(st["sensitivity"]), _fmt(st["specificity"]),
                      _fmt(st["accuracy"]), _fmt(st["auc"]), _ci_text(auc_ci.get(name)).strip(),
                      st["tp"], st["fn"], st["fp"], st["tn"]) for name, st in cls["per_class"].items()],
            "names": [DISPLAY_NAMES.get(c, c) for c in cls["classes"]],
            "confusion": cls["confusion"],
            "ece": cls.get("ece_note") or f"{_fmt(cls.get('ece'))} ({cls.get('ece_bins')} equal-width bins of the "
                                           "top probability)",
            "challenge": _challenge_table(cls.get("challenge")),
            "decision": _decision_table(cls.get("decision")),
            "decision_note": cls.get("decision_note"),  # why the label column was not scored
        }
    return tables


def _challenge_table(challenge: dict[str, dict] | None) -> dict[str, Any] | None:
    """The ISIC 2017 scorer's figures (score.challenge_scores) as the terminal shows them."""
    if not challenge:
        return None
    from dermtool.score import CHALLENGE_COLUMNS

    return {"header": ["class", *CHALLENGE_COLUMNS],
            "rows": [(DISPLAY_NAMES.get(name, name), *(_fmt(figures[k]) for k in CHALLENGE_COLUMNS.values()))
                     for name, figures in challenge.items()]}


def _decision_table(decision: dict[str, Any] | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    return {"summary": f"BACC {_fmt(decision['bacc'])}, accuracy {_fmt(decision['accuracy'])}; "
                       f"{decision['n_differ_from_argmax']} labels differ from the argmax",
            "rows": [(DISPLAY_NAMES.get(name, name), _fmt(st["sensitivity"]), _fmt(st["specificity"]),
                      st["tp"], st["fn"], st["fp"], st["tn"]) for name, st in decision["per_class"].items()]}


def _sources(*paths) -> list[tuple[str, str]]:
    names = ("predictions", "truth", "predicted masks", "truth masks", "images")
    return [(n, str(p)) for n, p in zip(names, paths) if p is not None]
