"""Pack the training side of ../shared/data small enough to travel to a lent GPU machine.

The `device` tool of this workplace copies the working tree, and at most 64 MiB of it, to the
GPU machine; the data sets beside the checkout do not travel, and TensorFlow is not installed
there. This writes, into one folder that `.git/info/exclude` must ignore (and that is never
committed, like the data it comes from):

- `isic2017/train`: every image, label and mask (masks re-saved as optimised 8-bit PNGs: the
  same pixels, a fraction of the bytes; checked image by image);
- `isic2020`: the images of the training side of a `dermtool split --group patient_id`, with
  their rows of labels.csv and metadata.csv (the benign-unknown ones train as "not melanoma");
- `ham10000`: the training side of a `dermtool split --group lesion_id`, every melanoma and
  benign keratosis of it and `--ham-nevi` of its nevi (seeded draw), masks re-saved likewise;
- `init/` (with `--init`): the ImageNet Lite0 encoder inside a segmentation model folder, its
  weights stored as float16, for `train --init-from`: the 17 MB package that ships the ImageNet
  weights does not fit beside the data. Its decoder is one filter wide, so no decoder layer
  matches the model being trained and none is copied: that model starts its own, as a fresh
  run does;
- `val/` (with `--with-val`): ISIC 2017 val, and the validation sides of both splits, so that the
  run chooses its epoch on the three sets as `train --val` does everywhere else.

Either way the model that comes back is scored here too, with the real infer, by
bench/validation.py.

    python bench/pack_device.py --out .devdata --ham-split SPLIT --isic2020-split SPLIT --init --with-val \
        --ham-nevi 2500 --zip .devpack/data.zip
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dermtool.errors import InputError
from dermtool.io import read_csv_rows, read_text, write_csv_atomic


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    rows = read_csv_rows(path, "label table")
    if not rows or "image_id" not in rows[0]:
        raise InputError(f"{path}: no image_id column in its header.")
    return rows[0], [dict(zip(rows[0], row)) for row in rows[1:] if row]


def _write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    write_csv_atomic(path, fields, [[r.get(f, "") for f in fields] for r in rows])


def _mask(src: Path, dest: Path) -> None:
    """The mask as an optimised 8-bit PNG, refused unless its pixels are the source's."""
    try:
        pixels = np.asarray(Image.open(src).convert("L"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{src}: not a readable mask ({exc}).") from None
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", optimize=True)
    if not np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), pixels):
        raise InputError(f"{src}: the re-saved mask differs from it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buf.getvalue())


def _ids(split: Path, side: str = "train") -> set[str]:
    return set(read_text(split / f"{side}.txt", "id list").split())


def _is(row: dict, column: str, path: Path) -> bool:
    try:
        return float(row[column]) == 1
    except (KeyError, ValueError):
        raise InputError(f"{path}: {row.get('image_id')} has no 0/1 value in column {column}.") from None


def _copy_whole(src: Path, dest: Path) -> None:
    """An ISIC 2017 folder: labels.csv, every image and every mask."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "labels.csv", dest / "labels.csv")
    for image in sorted((src / "images").glob("*.jpg")):
        shutil.copy(image, dest / "images" / image.name)
    for mask in sorted((src / "masks").glob("*.png")):
        _mask(mask, dest / "masks" / mask.name)


def _copy_ids(src: Path, dest: Path, keep: set[str], masks: bool) -> None:
    """The images `keep` names, their rows of labels.csv and metadata.csv, and their masks."""
    for name in ("labels.csv", "metadata.csv"):
        fields, rows = _rows(src / name)
        _write_rows(dest / name, fields, [r for r in rows if r["image_id"] in keep])
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for image_id in sorted(keep):
        shutil.copy(src / "images" / f"{image_id}.jpg", dest / "images" / f"{image_id}.jpg")
        if masks:
            _mask(src / "masks" / f"{image_id}_segmentation.png", dest / "masks" / f"{image_id}_segmentation.png")


def pack_isic2017(data: Path, out: Path) -> None:
    _copy_whole(data / "isic2017" / "train", out / "isic2017" / "train")


def pack_isic2020(data: Path, out: Path, split: Path, side: str = "train") -> None:
    dest = out / ("isic2020" if side == "train" else "val/isic2020")
    _copy_ids(data / "isic2020", dest, _ids(split, side), masks=False)


def pack_ham(data: Path, out: Path, split: Path, nevi: int, seed: int) -> dict:
    src, train = data / "ham10000", _ids(split)
    labels = src / "labels.csv"
    rows = [r for r in _rows(labels)[1] if r["image_id"] in train]
    mel = [r for r in rows if _is(r, "melanoma", labels)]
    sk = [r for r in rows if not _is(r, "melanoma", labels) and _is(r, "seborrheic_keratosis", labels)]
    nv = [r for r in rows if not _is(r, "melanoma", labels) and not _is(r, "seborrheic_keratosis", labels)]
    picked = np.random.default_rng(seed).permutation(len(nv))[:nevi]
    keep = {r["image_id"] for r in mel + sk + [nv[i] for i in picked]}
    _copy_ids(src, out / "ham10000", keep, masks=True)
    return {"melanoma": len(mel), "seborrheic_keratosis": len(sk), "nevus": len(picked), "nevi_in_split": len(nv)}


def pack_val(data: Path, out: Path, ham_split: Path, i20_split: Path) -> None:
    """The three validation sets: ISIC 2017 val whole, the validation sides of both splits."""
    _copy_whole(data / "isic2017" / "val", out / "val" / "isic2017")
    _copy_ids(data / "ham10000", out / "val" / "ham10000", _ids(ham_split, "val"), masks=True)
    pack_isic2020(data, out, i20_split, side="val")


def pack_init(like: Path, out: Path) -> None:
    """A segmentation model folder with the ImageNet Lite0 encoder, weights stored as float16."""
    import dataclasses

    import h5py

    from dermtool.config import ModelConfig, load_config, save_config
    from dermtool.models import build_models, load_pretrained

    cfg, _, _ = load_config(like)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    base = {k: v for k, v in dataclasses.asdict(cfg).items() if k in fields}
    base.update(task="seg", pretrained=True, cls_views="frame", temperature=1.0, melanoma_threshold=None,
                calibration=None, base_filters=1)  # a decoder no trained model's layers match
    seg_cfg = ModelConfig(**{k: v for k, v in base.items() if k in fields})
    model, _ = build_models(seg_cfg)
    load_pretrained(model, seg_cfg)
    out.mkdir(parents=True, exist_ok=True)
    full = out / "float32.weights.h5"
    model.save_weights(str(full))
    with h5py.File(full, "r") as src, h5py.File(out / "model.weights.h5", "w") as dst:
        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                dst.create_dataset(name, data=data.astype(np.float16) if data.dtype == np.float32 else data)
                for k, v in obj.attrs.items():
                    dst[name].attrs[k] = v
            else:
                group = dst.require_group(name)
                for k, v in obj.attrs.items():
                    group.attrs[k] = v
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        src.visititems(copy)
    full.unlink()
    save_config(out / "config.json", seg_cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path(".devdata"))
    ap.add_argument("--ham-split", type=Path, required=True, help="a `dermtool split` folder of ham10000")
    ap.add_argument("--isic2020-split", type=Path, required=True, help="a `dermtool split --group patient_id` folder")
    ap.add_argument("--ham-nevi", type=int, default=2500, help="HAM nevi to keep (all melanomas and keratoses are)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", action="store_true", help="also write init/: the ImageNet encoder as float16")
    ap.add_argument("--with-val", action="store_true", help="also write val/: the three validation sets")
    ap.add_argument("--zip", type=Path, help="also write the folder as one stored (uncompressed) zip: the size "
                    "limit counts each small file's disk blocks, one file travels at its own size")
    ap.add_argument("--like", type=Path, default=Path("weights/isic-ham-lite0-joint-192"),
                    help="model folder whose architecture init/ copies")
    args = ap.parse_args()
    needed = ["isic2017/train", "isic2020", "ham10000"] + (["isic2017/val"] if args.with_val else [])
    missing = [args.data / name for name in needed if not (args.data / name).is_dir()]
    if missing:
        print(f"skipped: {missing[0]} not found (the real data sets are needed).")
        return
    try:
        _ids(args.ham_split), _ids(args.isic2020_split)  # a wrong split folder, before minutes of copying
        pack(args)
    except InputError as exc:
        raise SystemExit(f"error: {exc}")


def pack(args) -> None:
    """Everything into a staging folder first: a refused input leaves the last pack as it was."""
    final, args.out = args.out, args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(args.out, ignore_errors=True)
    pack_isic2017(args.data, args.out)
    pack_isic2020(args.data, args.out, args.isic2020_split)
    ham = pack_ham(args.data, args.out, args.ham_split, args.ham_nevi, args.seed)
    if args.with_val:
        pack_val(args.data, args.out, args.ham_split, args.isic2020_split)
    if args.init:
        pack_init(args.like, args.out / "init")
    shutil.rmtree(final, ignore_errors=True)
    args.out.rename(final)
    args.out = final
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    if args.zip:
        import zipfile

        args.zip.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(args.zip, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(p for p in args.out.rglob("*") if p.is_file()):
                archive.write(path, path.relative_to(args.out.parent))
        print(f"{args.zip}: {args.zip.stat().st_size / 2**20:.1f} MiB (unpack there: python3 -m zipfile -e {args.zip} .)")
    print(f"HAM10000 kept: {ham}")
    for part in sorted(p for p in args.out.iterdir() if p.is_dir()):
        size = sum(p.stat().st_size for p in part.rglob("*") if p.is_file())
        print(f"{part.name:10s} {size / 2**20:6.1f} MiB")
    print(f"{'total':10s} {total / 2**20:6.1f} MiB")


if __name__ == "__main__":
    main()
