"""The Python API: dermtool in a notebook or a pipeline, running the code `dermtool infer` runs.

    import dermtool
    model = dermtool.load_model()                      # the bundled model
    p = model.predict("lesion.jpg")                    # one image in, one Prediction out
    p.label, p.probabilities, p.mask.shape             # mask: bool, the image's own size
    for p in model.predict(my_generator_of_arrays()):  # streamed in batches: flat memory
        ...

An image is decoded and fitted by `preprocess.prepare` (a path, or a PIL JPEG opened from a file
and not yet decoded) or `preprocess.prepare_pixels` (an array or another PIL image), the model
runs through `infer.predict_batch` and the outputs are post-processed by `infer.finish_image`:
the functions `dermtool infer` uses, so a Prediction equals the CLI's outputs for the same image
and options.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Union

import numpy as np

from dermtool.config import ModelConfig
from dermtool.data import image_id_of
from dermtool.errors import InputError, unreadable
from dermtool.infer import InferOptions, finish_image, predict_batch, with_model_threshold
from dermtool.postprocess import PostprocessConfig
from dermtool.preprocess import Transform, _to_rgb_image, prepare, prepare_pixels, restore

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

#: One image: an H x W x 3 uint8 RGB array, a PIL image, or the path of an image file
#: (any format `dermtool infer` reads, DICOM included).
ImageLike = Union[np.ndarray, "PILImage", str, os.PathLike]


@dataclass(eq=False)
class Prediction:
    """The model's answer for one image, at the image's own size.

    Attributes:
        image_id: the file name without its extension for a path (as `dermtool infer` names its
            outputs), the file name of a PIL image opened from a file, else None.
        mask: boolean lesion mask, H x W, post-processed as `dermtool infer` does (threshold,
            closing, largest component, hole filling, inverse geometry); None for a model
            without a segmentation head.
        probabilities: class name -> probability (melanoma, seborrheic_keratosis, nevus); None
            for a model without a classification head.
        label: the most probable class; None without a classification head.
        transform: how the image was fitted into the model's square (`preprocess.Transform`).
    """

    image_id: str | None
    mask: np.ndarray | None
    probabilities: dict[str, float] | None
    label: str | None
    transform: Transform
    _square: np.ndarray | None = field(default=None, repr=False)  # the model's lesion probability

    def __repr__(self) -> str:  # the mask by its shape: a notebook shows one line, not pages of numbers
        mask = self.mask
        mask = "None" if mask is None else f"<{mask.shape[0]}x{mask.shape[1]} bool, {mask.mean():.1%} lesion>"
        probabilities = None if self.probabilities is None else {k: round(v, 4) for k, v in self.probabilities.items()}
        return f"Prediction(image_id={self.image_id!r}, label={self.label!r}, probabilities={probabilities}, mask={mask})"

    @cached_property
    def probability_map(self) -> np.ndarray | None:
        """Lesion probability per pixel (float32, H x W, before post-processing): the map that
        `dermtool infer --probabilities` writes. Computed on first use, so a stream of
        predictions that never asks for it does not hold a float image per prediction."""
        return None if self._square is None else restore(self._square, self.transform)


class Model:
    """A model loaded once for many predictions (see `load_model`).

    Attributes:
        config: the model's `ModelConfig` (task, input size, fit, threshold, class names).
        engine: what runs the network: "keras", "litert", "onnx" or "savedmodel".
        path: the file the engine runs (the weights, or the exported model).
    """

    def __init__(self, engine) -> None:
        self._engine = engine
        self.config: ModelConfig = engine.cfg
        self.engine: str = engine.name
        self.path: Path = Path(engine.path)

    def __repr__(self) -> str:
        return f"Model({self.config.task}, {self.config.size} px, engine={self.engine}, path={str(self.path)!r})"

    def predict(self, images: ImageLike | Iterable[ImageLike], tta: int = 1, batch_size: int = 8,
                threshold: float | None = None, closing_radius: int = 3, largest_component: bool = True,
                fill_holes: bool = True, workers: int = 0,
                melanoma_threshold: float | None = None,
                cls_views: str | None = None) -> Prediction | list[Prediction] | Iterator[Prediction]:
        """Segment and classify one image or many, with `dermtool infer`'s code and options.

        Args:
            images: one image (an H x W x 3 uint8 array, a PIL image or a path) -> one
                Prediction; a list or tuple of them (or an N x H x W x 3 array) -> a list of
                Predictions in the same order; any other iterable, such as a generator -> an
                iterator that yields one Prediction per image as it goes, holding one batch at
                a time, so a stream of any length keeps memory flat.
            tta: 1 (off), 4 (flips) or 8 (flips and transposes) views averaged, as `--tta`.
            batch_size: images per model call, as `--batch-size`.
            melanoma_threshold: the label is melanoma when p(melanoma) is at least this, as
                `--melanoma-threshold`; None uses the model's own operating point (config.json),
                or the plain argmax when it has none.
            threshold, closing_radius, largest_component, fill_holes: the post-processing, as
                `dermtool infer`'s options of those names (threshold None: the model's own).
            workers: decoding and post-processing threads (0: one per core, at most 8).

        Raises:
            InputError: an option out of range, or an image that is not readable (naming it);
                an iterator raises it when it reaches that image.
        """
        # PostprocessConfig and InferOptions check every option as dermtool infer does
        post = PostprocessConfig(threshold, closing_radius, largest_component, fill_holes)
        opts = with_model_threshold(InferOptions(batch_size=batch_size, tta=tta, post=post, workers=workers,
                                                 melanoma_threshold=melanoma_threshold, cls_views=cls_views),
                                    self.config)
        if _is_one_image(images):
            return next(self._stream([images], opts, 1))
        if isinstance(images, (list, tuple, np.ndarray)):
            # a known number of images: batches no larger than the next power of two above it (the
            # last padded), so lists of any length reuse a few traced graphs, not one per length
            return list(self._stream(images, opts, max(1, min(batch_size, 1 << max(0, len(images) - 1).bit_length())),
                                     held=True))
        if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):
            raise InputError(f"images must be an image, a path or an iterable of them, not {type(images).__name__}.")
        return self._stream(images, opts, batch_size)

    def _stream(self, images: Iterable, opts: InferOptions, batch_size: int, held: bool = False) -> Iterator[Prediction]:
        """Predictions of `images` in order, a batch at a time. Paths and arrays are fitted on the
        thread pool, arrays copied as they are taken (a generator may refill one buffer); a PIL
        image is fitted as it is taken unless the caller holds them all (`held`: a list), since a
        generator may close it (`with Image.open(f) as im: yield im`) or paste the next frame into
        it. One PIL object listed twice in a list is fitted once: two threads decoding one file
        object corrupt each other. A bad image, or an error of the source, is raised after the
        predictions of the images before it."""
        workers = opts.workers or min(8, max(2, os.cpu_count() or 1))
        items = iter(images)
        with ThreadPoolExecutor(workers) as pool:
            while True:
                pending, seen, problem = [], {}, None
                while len(pending) < batch_size:
                    try:
                        image = next(items)
                    except StopIteration:
                        break
                    except Exception as exc:  # the caller's generator failed: what came before is still given
                        problem = exc
                        break
                    if isinstance(image, np.ndarray):
                        image = image.copy()
                    if isinstance(image, (str, os.PathLike, np.ndarray)) or not _is_one_image(image):
                        pending.append(pool.submit(self._prepare, image))
                    elif not held:  # fitted now: the generator may close it, or paste the next frame into it
                        pending.append(_done(self._prepare, image))
                    elif id(image) in seen and seen[id(image)][0] is image:
                        pending.append(seen[id(image)][1])
                    else:
                        job = pool.submit(self._prepare, image)
                        seen[id(image)] = (image, job)  # holding the image keeps its id from being reused
                        pending.append(job)
                loaded = []
                for job in pending:
                    try:
                        loaded.append(job.result())
                    except Exception as exc:
                        problem = exc
                        break
                if loaded:
                    outputs = predict_batch(self._engine, [x for x, _, _ in loaded], opts.tta, batch_size,
                                            self.config.temperature, opts.cls_views == "frame+lesion")
                    yield from pool.map(lambda a: self._finish(*a, opts), zip(loaded, outputs))
                if problem is not None:
                    raise problem
                if len(pending) < batch_size:
                    return

    def _prepare(self, image: ImageLike) -> tuple[np.ndarray, Transform, str | None]:
        cfg = self.config
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if path.is_dir():
                raise InputError(f"{path}: a folder; pass its image paths, or use dermtool.predict_folder.")
            x, t = prepare(path, cfg.size, cfg.fit, cfg.border, cfg.margin, cfg.input_chain)
            return x, t, image_id_of(path)
        image_id = None
        if not isinstance(image, np.ndarray) and not _is_one_image(image):
            raise InputError(f"an image is a path, an H x W x 3 uint8 array or a PIL image, not {type(image).__name__}.")
        if not isinstance(image, np.ndarray):  # a PIL image: the colour conversion files get
            filename = getattr(image, "filename", "")
            image_id = image_id_of(Path(filename)) if filename else None
            source = _unread_jpeg_file(image)
            if source is not None:  # read as its file is: decoded at reduced size, as the path would be
                x, t = prepare(source, cfg.size, cfg.fit, cfg.border, cfg.margin, cfg.input_chain)
                if (t.orig_w, t.orig_h) == image.size:
                    return x, t, image_id
            try:  # Pillow's own errors for a truncated file, a closed one, a mode it cannot convert
                image = np.asarray(_to_rgb_image(image))
            except (OSError, ValueError, SyntaxError, AssertionError, EOFError) as exc:
                name = filename or f"a PIL image ({image.mode}, {image.size[0]} x {image.size[1]})"
                if "closed" in str(exc) or isinstance(exc, AssertionError) and getattr(image, "fp", 0) is None:
                    raise InputError(f"{name}: the PIL image was closed before dermtool read its pixels (a `with "
                                     "Image.open(...)` block that ended?); call .load() inside it, or pass the "
                                     "path.") from None
                raise InputError(unreadable(name, exc, "not a readable PIL image")) from None
        _check_pixels(image)
        x, t = prepare_pixels(image, cfg.size, cfg.fit, cfg.border, cfg.margin, cfg.input_chain)
        return x, t, image_id

    def _finish(self, loaded: tuple, output: tuple, opts: InferOptions) -> Prediction:
        (_, t, image_id), (seg, cls) = loaded, output
        mask, label = finish_image(seg, cls, t, opts.post, opts.melanoma_threshold)
        probabilities = None if cls is None else {n: float(p) for n, p in zip(self.config.class_names, cls)}
        return Prediction(image_id, mask, probabilities, label or None, t, seg)


def _done(fn, *args) -> Future:
    """`fn(*args)` run now, as a finished Future (its result or its exception)."""
    job = Future()
    try:
        job.set_result(fn(*args))
    except Exception as exc:
        job.set_exception(exc)
    return job


def _is_one_image(images) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim != 4
    if isinstance(images, (str, os.PathLike)):
        return True
    return hasattr(images, "getbands") and hasattr(images, "size")  # a PIL image, without importing PIL


def _unread_jpeg_file(image) -> Path | None:
    """The file of a PIL JPEG opened from it and not yet decoded (`Image.open(path)`), else None.

    The path route decodes a large JPEG at reduced size (DCT scaling, `preprocess.load_image`),
    a model input other than its full-size pixels; such an image goes that route too, so it gives
    the path's result. One already decoded (`.load()`, or any pixel access), drafted, or opened
    from a file object has only its pixels to go by.
    """
    filename = getattr(image, "filename", "")
    fp = getattr(image, "fp", None)
    if getattr(image, "format", None) != "JPEG" or not filename or not getattr(image, "tile", None):
        return None
    if getattr(image, "decoderconfig", ()) or fp is None:  # drafted: the caller chose another size
        return None
    try:  # the very file it was opened from, not another one put at that path since
        return Path(filename) if os.path.samestat(os.fstat(fp.fileno()), os.stat(filename)) else None
    except (OSError, ValueError, AttributeError):  # no file descriptor (BytesIO), or the file is gone
        return None


def _check_pixels(pixels: np.ndarray) -> None:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise InputError(f"an image array must be H x W x 3 uint8 RGB, not shape {pixels.shape} {pixels.dtype}.")


def load_model(path: str | os.PathLike | None = None, engine: str | None = None) -> Model:
    """Load a model for `Model.predict`.

    Args:
        path: anything `dermtool infer --model` takes: a run folder of `dermtool train`, a model
            folder, an export folder of `dermtool export` or its .tflite / .onnx file. None:
            the bundled model.
        engine: as `--engine`: "keras", "litert", "onnx" or "savedmodel"; None is the model's
            own runtime (keras for a model folder, the export's for an export).

    Raises:
        InputError: not a model, weights that do not fit, an engine without its package.
    """
    from dermtool.modelio import load_engine

    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a model folder or file path (or None: the bundled model), not {type(path).__name__}.")
    return Model(load_engine(Path(path) if path is not None else None, engine))
