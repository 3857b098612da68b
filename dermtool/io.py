"""Reading and writing the files dermtool exchanges with users: label CSVs and mask PNGs.

Every reader checks its input at the edge and raises `InputError` with one sentence that names
the file (and row) and the problem, so the CLI can print it without a traceback. Text files
(CSVs, JSON records, id lists) are all read by `read_text` (and `read_csv_rows`, `read_json`
on top of it), which checks size, encoding and emptiness the same way for every one; outputs
are written whole or not at all by `write_atomic`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
import shutil
import struct
import unicodedata
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from dermtool import CLASS_NAMES
from dermtool.errors import InputError

#: Columns every ISIC 2017 Part 3 CSV must carry; `nevus` is optional.
REQUIRED_COLUMNS = ("image_id", "melanoma", "seborrheic_keratosis")
#: ISIC naming of a segmentation mask: `<image_id>_segmentation.png`.
MASK_SUFFIX = "_segmentation.png"
#: The ISIC scorer binarises 8-bit masks with `value > 128`.
MASK_THRESHOLD = 128
#: The most pixels (width x height) an image or mask may declare. Dermoscopy frames reach ~30
#: megapixels; a file declaring more is refused from its header, before any pixel is decoded,
#: since a few kB of PNG can declare gigabytes.
MAX_PIXELS = 200_000_000
#: the most bytes one decoded image may take: MAX_PIXELS of 16-bit RGBA
MAX_DECODED_BYTES = MAX_PIXELS * 8
#: How many ids an error message lists before "..." (keeps it one readable sentence).
_IDS_SHOWN = 3
#: The largest text file read (CSV, JSON, id list): a label CSV of a million images is ~50 MB,
#: so a larger file is not one of dermtool's, and reading it whole would only fill memory.
MAX_TEXT_BYTES = 256 * 2**20
#: Byte-order marks Windows tools write (Notepad, Excel's "Unicode text"), and their codecs.
_BOMS = ((codecs.BOM_UTF8, "utf-8", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
         (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"))


#: the first characters that make a spreadsheet read a CSV cell as a formula (CSV injection)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: the longest image id (UTF-8 bytes) whose outputs fit a file name of 255 bytes: the longest
#: suffix is "_segmentation.png" / "_segmentation.dcm" (17)
MAX_ID_BYTES = 255 - len("_segmentation.png")


def formula_name(path: Path, csv_name: str) -> str:
    """Why an image file cannot be run under its name, or "" when it can: its id would start a
    formula in `csv_name` when a spreadsheet opens it, be read stripped (a space at either end),
    break a row of it (a line break or other control character), cannot be written to it (a name that is not UTF-8, as a file copied
    from a Latin-1 system may have), or is too long for its outputs' names (`MAX_ID_BYTES`)."""
    path = Path(path)
    try:
        size = len(path.stem.encode("utf-8"))
    except UnicodeEncodeError:
        return (f"{os.fsencode(path)!r}: its name is not valid UTF-8 (a file from a system of another encoding), so "
                f"{csv_name} cannot name it; rename the file.")
    if path.stem.startswith(FORMULA_STARTS):
        return (f"{path}: its name starts with {path.stem[0]!r}, which a spreadsheet opening {csv_name} would run as "
                "a formula; rename the file.")
    if path.stem != path.stem.strip():  # CSV readers strip it: " a" and "a" would be one image to score
        return (f"{str(path)!r}: its name starts or ends with a space, which CSV readers strip, so {csv_name} could not "
                "tell it from the name without; rename the file.")
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in path.stem):  # every break splitlines() makes
        return (f"{str(path)!r}: its name holds a line break or another control character, which would break its row of "
                f"{csv_name}; rename the file.")
    if size > MAX_ID_BYTES:
        return (f"{path.parent / path.name[:60]}...{path.suffix}: its name without the extension is {size} bytes "
                "long; its outputs' names (<id>_segmentation.png) would pass the file system's 255, so ids of at most "
                f"{MAX_ID_BYTES} bytes are run; rename the file.")
    return ""


def id_key(image_id: str) -> str:
    """An id as ids are compared: in Unicode's composed form (NFC), so that é typed as one
    character and é as e + accent (as macOS writes names) are one id, as `data.unique_ids` counts
    them, in --ids lists, merge's checks and score alike."""
    return unicodedata.normalize("NFC", image_id)


def by_own_ids(table: dict, image_ids) -> dict:
    """`table` (keyed by the ids a CSV or a mask folder names) also keyed by `image_ids` (the ids
    it is looked up by: the images' own, or the truth's in `score`) where the two name one image
    in two Unicode forms (é as one character, or e + accent as macOS writes names). An exact
    match always wins; the entries under the table's own ids stay, so `[k for k in table if
    id_key(k) not in ...]` still finds the rows of no image."""
    keyed = {}
    for k, v in table.items():
        keyed.setdefault(id_key(k), v)
    out = dict(table)
    for image_id in image_ids:
        if image_id not in out and id_key(image_id) in keyed:
            out[image_id] = keyed[id_key(image_id)]
    return out


def first_few(ids: list[str]) -> str:
    """The first few ids, comma separated, with "..." when there are more."""
    shown = ", ".join(ids[:_IDS_SHOWN])
    return shown + (", ..." if len(ids) > _IDS_SHOWN else "")


def read_text(path: Path, what: str, *, limit: int = MAX_TEXT_BYTES, empty_ok: bool = False) -> str:
    """The text of a file dermtool reads, checked: the one reader of every CSV, JSON and id list.

    UTF-8, and UTF-8 or UTF-16 with a byte-order mark (as Windows tools save text), are read;
    anything else is refused rather than guessed.

    Args:
        path: the file.
        what: what the file is, for the messages ("id list", "shard record").
        limit: the largest size in bytes.
        empty_ok: accept a file with nothing but white space (returned as is).

    Raises:
        InputError: naming the file, when it is missing, a folder, unreadable, larger than
            `limit`, not text in those encodings (or holds NUL characters), or empty.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError(f"{path}: the {what} is a folder, not a file.")
        size = path.stat().st_size
        if size > limit:
            raise InputError(f"{path}: the {what} is {_size(size)}, more than the {_size(limit)} such a file "
                             "can be; is it the right file?")
        # opened without waiting: a FIFO planted where a file is read (a record in a shared folder)
        # would block the open until some process wrote to it; read then, a FIFO nobody writes to
        # reads as empty, while one that is written to (--ids <(...)) is read whole
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: the {what} does not exist.") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc.strerror or exc}).") from None
    text = _decode(data, path, what)
    if not empty_ok and not text.strip():
        raise InputError(f"{path}: the {what} is empty.")
    return text


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n} bytes"


def _decode(data: bytes, path: Path, what: str) -> str:
    bom, codec, name = next((b for b in _BOMS if data.startswith(b[0])), (b"", "utf-8", "UTF-8"))
    try:
        text = data[len(bom):].decode(codec)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: the {what} is not {name} text (byte 0x{data[len(bom) + exc.start]:02x} at "
                         f"offset {len(bom) + exc.start}); save it as UTF-8.") from None
    if "\x00" in text:
        raise InputError(f"{path}: the {what} holds NUL bytes, so it is binary or UTF-16 without a byte-order "
                         "mark, not text; save it as UTF-8.")
    return text


def read_csv_rows(path: Path, what: str, **checks) -> list[list[str]]:
    """The rows of a CSV file, read by `read_text` (same checks, same keyword arguments)."""
    try:
        return list(csv.reader(io.StringIO(read_text(path, what, **checks), newline="")))
    except csv.Error as exc:
        raise InputError(f"{path}: the {what} is not valid CSV ({exc}).") from None


def read_json(path: Path, what: str, kind: type = dict):
    """A JSON file whose top level must be a `kind` (an object by default), read by `read_text`.

    Raises:
        InputError: naming the file, for any problem of `read_text`, JSON that does not parse,
            or a top level of another type.
    """
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except RecursionError:
        raise InputError(f"{path}: the {what} nests too deeply to be one of dermtool's.") from None
    except ValueError as exc:
        raise InputError(f"{path}: the {what} is not valid JSON ({exc}).") from None
    if not isinstance(value, kind):
        names = {dict: "an object", list: "a list"}
        raise InputError(f"{path}: the {what} holds {names.get(type(value), 'a ' + type(value).__name__)} "
                         f"where {names.get(kind, 'a ' + kind.__name__)} is expected.")
    return value


def write_atomic(path: Path, write: Callable[[Path], object], *, named: bool = False) -> None:
    """Write `path` whole or not at all: `write(tmp)` fills a temporary file beside it, which then
    replaces `path` (one rename). The one writer of dermtool's output files.

    A failure leaves no temporary file, and its OSError names `path`, not the temporary file,
    so `errors.write_failure` words it for the file the user asked for.

    named: the user named this file itself (score --json FILE), so a symbolic link is followed
    (the file it names is replaced, the link stays) and a FIFO or a device (/dev/stdout) is
    written through. A file dermtool names inside a folder (a mask of infer --out) is never
    written through a link: a link planted there replaces nothing outside the folder.
    """
    path = Path(path)
    if named and path.is_symlink():  # replace the file it points to, not the link
        path = path.resolve()
    if named and path.exists() and not path.is_file() and not path.is_dir():
        # a FIFO or a device (/dev/stdout, /dev/null): written through, never replaced by a file
        write(path)
        return
    # A plain name (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f"{temp_prefix(path.name)}{os.getpid()}.tmp")
    try:
        write(claim(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        if not exc.errno:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    finally:
        try:
            if tmp.is_file():
                tmp.unlink()
        except OSError:  # never hide the error that brought us here
            pass


def temp_prefix(name: str) -> str:
    """The start of the temporary names `write_atomic` gives while writing `name` (then the pid
    and ".tmp"): ".NAME.", or, where that would pass 255 bytes, ".<sha1 of NAME>."."""
    prefix = f".{name}."
    if len(os.fsencode(prefix)) + 24 <= 255:
        return prefix
    import hashlib

    return f".{hashlib.sha1(os.fsencode(name)).hexdigest()}."


def remove_stale_temps(folder: Path, names: set[str]) -> int:
    """Remove temporary files `write_atomic` left in `folder` for these output names (a run killed
    mid-write leaves one); returns how many. Only for names this run writes again, so no other
    process's file is touched."""
    prefixes = {temp_prefix(n) for n in names}
    removed = 0
    for entry in os.scandir(folder):
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")) or not entry.is_file(follow_symlinks=False):
            continue
        head, _, pid = name[:-4].rpartition(".")
        if pid.isdigit() and f"{head}." in prefixes:
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def claim(path: Path) -> Path:
    """Make `path` a new, empty regular file of dermtool's before a fixed-name temporary file is
    written there: whatever was at the name, a link planted by someone who can write the folder
    included, is removed (never followed), and the file is created with O_EXCL | O_NOFOLLOW, so
    a link made in between fails the write rather than redirecting it outside the folder."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666))
    return path


def open_append(path: Path, **kwargs):
    """`open(path, "a")` that never appends through a link (O_NOFOLLOW): a command.txt or a
    partial CSV planted as a link to a file outside the folder is refused (ELOOP), and so is a
    hard link (a file of more than one name: the same file under another name elsewhere)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    if os.fstat(fd).st_nlink > 1:
        os.close(fd)
        raise InputError(f"{path}: a file with another name too (a hard link), where dermtool keeps a file of its "
                         "own; it does not append to a file that may be someone else's: remove it and run again.")
    return os.fdopen(fd, "a", **kwargs)


def staging_folder(final: Path) -> Path:
    """A new, empty folder to build `final` in (see `publish`): inside `final` when that folder
    exists (the same file system, and no need to write its parent), else beside it, renamed onto
    it when whole. A hidden name of its own, never an existing folder (which may be the user's),
    made with mode 0777 so the kernel applies the umask as for any folder (mkdtemp's 0700 would
    stay after the rename, and reading the umask means setting it, which threads would race)."""
    import secrets

    final = Path(final)
    parent = final if final.is_dir() else final.parent
    while True:
        staging = parent / f".{final.name}.partial-{secrets.token_hex(4)}"
        try:
            staging.mkdir(0o777)
            return staging
        except FileExistsError:
            continue


def publish(staging: Path, final: Path, last: str = "config.json") -> None:
    """Move what was built in `staging` (see staging_folder) onto `final`: one rename when
    `final` does not exist; else each entry is moved in (replacing its namesake) and `last`
    (the file that makes the folder what it is: a model's config.json, a page) arrives last.
    An existing `final` stays the same folder, so a shell inside it still sees it."""
    staging, final = Path(staging), Path(final)
    if not final.exists():
        staging.rename(final)
        return
    if staging.parent.resolve() != final.resolve():
        raise ValueError(f"{staging} is not inside {final}")  # staging_folder puts it there
    for item in sorted(staging.iterdir(), key=lambda p: p.name == last):
        target = final / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def read_class_csv(path: Path, *, role: str = "truth") -> dict[str, np.ndarray]:
    """Read an ISIC 2017 Part 3 CSV (`image_id,melanoma,seborrheic_keratosis[,nevus]`).

    Without a `nevus` column, nevus = 1 - melanoma - seborrheic_keratosis, clipped at 0 (a truth
    row with both 0 is a nevus). Extra columns (such as dermtool's `label`) are ignored.

    Args:
        path: the CSV file.
        role: "truth" (scoring: a row with both melanoma and seborrheic_keratosis is refused),
            "labels" (training labels: such a row is left to the data check of preprocess) or
            "predictions"; also words the error messages.

    Returns:
        image_id -> float64 array (melanoma, seborrheic_keratosis, nevus), in file order.

    Raises:
        InputError: missing/empty file, missing columns, duplicate ids, a value that is
            empty, non-numeric, NaN or outside [0, 1], or (role "truth") a value other than
            0 or 1, or a row that names two classes or (with a nevus column) none.
    """
    path = Path(path)
    what = f"{role} CSV {path}"
    # numbered as the file's rows before blank ones are passed over, so a message names the row
    # an editor shows
    numbered = [(n, row) for n, row in enumerate(read_csv_rows(path, f"{role} CSV", empty_ok=True), start=1)
                if any(cell.strip() for cell in row)]
    rows = [row for _, row in numbered]
    if not rows:
        raise InputError(f"The {what} is empty; expected a header {','.join(REQUIRED_COLUMNS)}.")
    header = [cell.strip() for cell in rows[0]]
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise InputError(
            f"The {what} lacks the column(s) {', '.join(missing)}; "
            f"its header is {','.join(header)}."
        )
    repeated = [name for name in ("image_id", *CLASS_NAMES) if header.count(name) > 1]
    if repeated:
        raise InputError(f"The {what} has the column {repeated[0]} {header.count(repeated[0])} times; "
                         "which one to read would be a guess.")
    if len(rows) == 1:
        raise InputError(f"The {what} has a header but no rows.")
    value_columns = [name for name in CLASS_NAMES if name in header]
    index = {name: header.index(name) for name in ("image_id", *value_columns)}
    result: dict[str, np.ndarray] = {}
    keys: dict[str, str] = {}  # id_key -> the id as first written: é and e + accent are one image
    for line, row in numbered[1:]:
        result_id, values = _parse_row(row, index, value_columns, what, line)
        if result_id in result:
            raise InputError(f"The {what} repeats image_id {result_id} at row {line}.")
        first = keys.setdefault(id_key(result_id), result_id)
        if first != result_id:
            raise InputError(f"The {what} repeats image_id {result_id} at row {line}, written in another Unicode form "
                             f"({first!a} and {result_id!a}: one image, as dermtool matches ids).")
        if role == "truth":
            _check_truth_row(values, header, what, line, result_id)
        result[result_id] = values
    return result


def read_label_column(path: Path, *, role: str = "predictions") -> dict[str, str] | None:
    """image_id -> the `label` column of a CSV (the class dermtool infer decided), or None when
    the CSV has no `label` column. Read after `read_class_csv` has checked the file.

    Raises:
        InputError: a label that is not one of the class names.
    """
    path = Path(path)
    numbered = [(n, row) for n, row in enumerate(read_csv_rows(path, f"{role} CSV"), start=1)
                if any(cell.strip() for cell in row)]  # numbered as the file's rows, as read_class_csv
    header = [cell.strip() for cell in numbered[0][1]]
    if "label" not in header:
        return None
    at, key = header.index("label"), header.index("image_id")
    labels = {}
    for line, row in numbered[1:]:
        value = row[at].strip() if len(row) > at else ""
        if value not in CLASS_NAMES:
            raise InputError(f"The {role} CSV {path} has label {value!r} at row {line}; "
                             f"a label is one of {', '.join(CLASS_NAMES)}.")
        labels[row[key].strip()] = value
    return labels


def _parse_row(
    row: list[str], index: dict[str, int], value_columns: list[str], what: str, line: int
) -> tuple[str, np.ndarray]:
    """One CSV row -> (image_id, [mel, sk, nevus]); `line` is the 1-based file line."""
    if len(row) <= max(index.values()):
        raise InputError(f"The {what} has too few fields at row {line}.")
    image_id = row[index["image_id"]].strip()
    if not image_id:
        raise InputError(f"The {what} has an empty image_id at row {line}.")
    values = {}
    for name in value_columns:
        cell = row[index[name]].strip()
        try:
            if "_" in cell:  # float() reads "0.7_0" as 0.70: a typo, not a number
                raise ValueError(cell)
            value = float(cell)
        except ValueError:
            raise InputError(
                f"The {what} has a non-numeric {name} value {cell!r} at row {line} ({image_id})."
            ) from None
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise InputError(
                f"The {what} has {name} = {cell} at row {line} ({image_id}); "
                "values must be numbers in [0, 1]."
            )
        values[name] = value
    if "nevus" not in values:
        # rounded: 1 - 0.45 - 0.10 is 0.45000000000000007 in floating point, which would turn an
        # exact tie with melanoma (the earlier class wins it) into a nevus
        values["nevus"] = max(0.0, round(1.0 - values["melanoma"] - values["seborrheic_keratosis"], 12))
    return image_id, np.array([values[name] for name in CLASS_NAMES], dtype=np.float64)


def _check_truth_row(values: np.ndarray, header: list[str], what: str, line: int, image_id: str) -> None:
    """A truth row names exactly one diagnosis, each value 0 or 1 (the ISIC files' 0.0 / 1.0): a
    row naming two classes, or (with a nevus column) none, is refused, never counted as the
    first class of a tie."""
    given = [name for name in CLASS_NAMES if name in header]
    named = {name: float(values[CLASS_NAMES.index(name)]) for name in given}
    odd = [f"{name} = {v:g}" for name, v in named.items() if v not in (0.0, 1.0)]
    if odd:
        raise InputError(f"The {what} has {', '.join(odd)} at row {line} ({image_id}); a truth value is 0 or 1.")
    ones = [name for name, v in named.items() if v == 1.0]
    if len(ones) > 1:
        raise InputError(f"The {what} names {' and '.join(ones)} at row {line} ({image_id}); "
                         "a truth row names one diagnosis, so set the others to 0.")
    if not ones and "nevus" in header:
        raise InputError(f"The {what} has every class 0 at row {line} ({image_id}); "
                         "a truth row names one diagnosis (with a nevus column, set it to 1 for a nevus).")


def both_classes(melanoma: float, seborrheic_keratosis: float) -> bool:
    """A truth row that names both diagnoses (each at 0.5 or more): ambiguous, never silently
    counted as the first of them."""
    return melanoma >= 0.5 and seborrheic_keratosis >= 0.5


def read_mask(path: Path) -> np.ndarray:
    """Read a mask image as a boolean HxW array; see `binarise_mask` for the rule.

    Raises:
        InputError: the file is missing or is not a readable image.
    """
    return binarise_mask(read_mask_values(path))


def two_valued_lesion(values: np.ndarray) -> float | None:
    """The lesion value v of a mask holding only 0 and v (or v alone: a lesion filling the
    frame), v not 255; None for any other mask. The ISIC scorer reads such a "binary image with
    a high value other than 255" as v = lesion: 0/1 (a common export) and 0/128 alike, which
    > 128 would read as empty."""
    if values.size == 0:
        return None
    high = values.max()
    if high == 0 or high == 255:
        return None
    if values.min() != high and np.any((values != 0) & (values != high)):
        return None
    return float(high)


def is_zero_one(values: np.ndarray) -> bool:
    """True for a mask stored as 0/1 (a common export): a lesion of 1s on 0, no other value; a
    mask of 1s only is a lesion that fills the frame."""
    return two_valued_lesion(values) == 1.0


#: a mask whose largest value is 2 to this is a label map (small class numbers), not a lesion mask
LABEL_MAP_MAX = 8


def is_label_map(values: np.ndarray, lesion: float | None | str = "find") -> bool:
    """True for a label map: largest value 2 to LABEL_MAP_MAX, and not a mask of 0 and that value
    alone (0/1/2, 1/2: class numbers, not a lesion mask). Binarising it at > 128 would read it as empty, so `score` refuses it and
    `preprocess` keeps its image without a mask. Two values 0 and v are a lesion mask
    (`two_valued_lesion`), as the ISIC scorer reads them."""
    if not (values.size > 0 and 1 < float(values.max()) <= LABEL_MAP_MAX):
        return False
    return (two_valued_lesion(values) if lesion == "find" else lesion) is None


def binarise_mask(values: np.ndarray, lesion: float | None | str = "find") -> np.ndarray:
    """Mask values -> boolean foreground, as the ISIC scorer reads a mask: a mask of 0 and one
    other value v has foreground = v (`two_valued_lesion`); any other, value > 128 (the ISIC
    threshold, which also reads a soft or JPEG-damaged mask). `lesion`: `two_valued_lesion(values)`
    when the caller has it already (one scan of the mask, not one a question)."""
    lesion = two_valued_lesion(values) if lesion == "find" else lesion
    return values == lesion if lesion is not None else values > MASK_THRESHOLD


def check_pixel_limit(path: Path, width: int, height: int) -> None:
    """Refuse (InputError naming `path`) an image or mask that declares more than MAX_PIXELS."""
    if width * height > MAX_PIXELS:
        _over_limit(path, f"{width} x {height} pixels ({width * height / 1e6:.0f} megapixels)")


def check_decoded_size(path: Path, n_bytes: int) -> None:
    """Refuse (InputError naming `path`) an image whose decoded array would exceed MAX_DECODED_BYTES:
    the pixel limit alone lets a file of many samples or wide ones through."""
    if n_bytes > MAX_DECODED_BYTES:
        _over_limit(path, f"{n_bytes / 1e9:.1f} GB decoded")


def _over_limit(path: Path, size: str):
    raise InputError(f"{path}: {size} is over the {MAX_PIXELS // 10**6}-megapixel limit for an image or mask; "
                     "it is not decoded.")


@contextmanager
def open_image(path: Path):
    """Pillow's lazy `Image.open`, the declared size checked against MAX_PIXELS before any pixel
    is decoded. Every image and mask dermtool decodes with Pillow is opened here.

    Raises:
        InputError: the file declares more pixels than MAX_PIXELS; other errors (missing file,
            not an image) are left to the caller, which words them for its file.
    """
    from PIL import Image

    # Pillow's own guard stays, at the same limit (its default, 89 MP, would refuse files
    # under ours); it warns above it and refuses only at twice it, so the check below refuses
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as err:  # over twice Pillow's own limit
            found = re.search(r"\((\d+) pixels\)", str(err))
            _over_limit(path, f"{int(found[1]) / 1e6:.0f} megapixels" if found else "its size")
    with image:
        check_pixel_limit(path, *image.size)
        yield image


def read_mask_values(path: Path) -> np.ndarray:
    """A mask image's values as an HxW array, before binarising (for checks on the data).

    A colour mask (RGB, RGBA) reads as the brightest of its colour channels, so a lesion drawn
    in any colour on black (green 0,255,0) is read, not only one bright in the first channel;
    alpha is not a colour. Grey+alpha uses the grey. A palette image is converted to its colours
    first, and a 1-bit image counts as 0/255.

    Raises:
        InputError: the file is missing or is not a readable image.
    """
    from PIL import UnidentifiedImageError  # deferred: only mask scoring needs Pillow

    path = Path(path)
    try:
        with open_image(path) as image:
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif image.mode == "1":
                image = image.convert("L")
            array = np.asarray(image)
    except FileNotFoundError:
        raise InputError(f"The mask file {path} does not exist.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise InputError(f"The mask file {path} is not a readable image ({err}).") from None
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1) if array.shape[-1] >= 3 else array[..., 0]
    if array.ndim != 2:
        raise InputError(f"The mask file {path} has shape {array.shape}; expected a 2-D image.")
    return array


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A boolean mask as the bytes of an 8-bit grayscale PNG, 0 = background and 255 = lesion
    (the ISIC format), written directly rather than through Pillow.

    Every row uses PNG's "Up" filter (the difference from the row above), which turns a mask
    into zeros except where the lesion's edge moves. zlib's run-length strategy packs those
    zeros faster than its fastest level and 3x smaller, and a small memLevel keeps its buffers
    in cache: 5 is ~40 % faster than 8 or 9 at the same size (bench/pipeline_bench.py).
    """
    rows = _up_filtered(mask)
    h, w = rows.shape[0], rows.shape[1] - 1
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 5, zlib.Z_RLE)
    data = packer.compress(rows) + packer.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grayscale, not interlaced
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _up_filtered(mask: np.ndarray) -> np.ndarray:
    """PNG scanlines of a 0/255 image of `mask`, each a filter byte (2, Up) and the row minus
    the row above, modulo 256 (the first row's "above" is zeros)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"a PNG mask needs a non-empty 2-D array, not shape {mask.shape}")
    ones = mask.view(np.uint8)
    rows = np.empty((mask.shape[0], mask.shape[1] + 1), np.uint8)
    rows[:, 0] = 2
    np.negative(ones[0], out=rows[0, 1:])  # 255 * m == -m, modulo 256
    np.subtract(ones[:-1], ones[1:], out=rows[1:, 1:])  # 255 * (m - above) == above - m
    return rows


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def find_masks(folder: Path) -> dict[str, Path]:
    """Map image_id -> mask path for every `<image_id>_segmentation.png` in `folder`.

    Raises:
        InputError: `folder` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"The mask folder {folder} does not exist or is not a folder.")
    return {
        path.name[: -len(MASK_SUFFIX)]: path
        for path in sorted(folder.iterdir())
        if path.name.endswith(MASK_SUFFIX) and len(path.name) > len(MASK_SUFFIX)
    }


def write_csv_atomic(path: Path, header: list[str], rows: list[list]) -> None:
    """Write a CSV so that readers never see a half-written file.

    The rows go to a temporary file in the same folder, which then replaces `path` with
    `os.replace` (atomic on one file system).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    write_atomic(path, write)
