"""Model folders and exported models: the one place that reads and writes them.

Three kinds of model, all described by a `config.json` (architecture, input geometry,
normalisation, threshold, class order) beside the network:

- a model folder: `config.json` + Keras weights (a run of `dermtool train`: best.weights.h5;
  a slim or bundled folder: model.weights.h5);
- an export folder of `dermtool export`: `config.json` with an "export" section, plus one of
  `model.tflite`, `model.onnx` or `saved_model/`;
- one of those exported files given by itself: its `config.json` is the one beside it.

A model folder may carry an export folder per engine inside it (`MODEL/litert/`, the bundled
model's calibrated mixed-int8 LiteRT file); `--engine litert` uses it when its config.json
names these weights (their sha1), and converts the folder otherwise.

`load_engine` opens any of them as an engine with `predict_on_batch(x) -> {"seg", "cls"}` (raw
0-255 RGB in, float32 probabilities out), its `cfg`, `name` and `path` (the file it runs),
which is all inference needs; the Keras engine, and the LiteRT engine of an export that carries
CLASSIFIER_FILE, also `classify(x) -> {"cls"}` without the mask decoder. `write_export` writes
an export folder. A new format is a writer and an engine class here, nothing elsewhere.
`write_keras` writes a model folder again (`dermtool export --format keras`), its weights
stored as float16 if asked: half the size on disk, computing in float32 as before.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from dermtool import __version__
from dermtool.config import ModelConfig, load_config, save_config
from dermtool.errors import InputError, as_disk_full
from dermtool.io import read_json

WEIGHT_NAMES = ("best.weights.h5", "model.weights.h5", "last.weights.h5")
#: export format -> the file or folder it writes inside the export folder
FORMATS = {"tflite": "model.tflite", "onnx": "model.onnx", "savedmodel": "saved_model"}
QUANTIZE = {"tflite": ("none", "float16", "dynamic", "int8", "mixed"), "onnx": ("none",), "savedmodel": ("none",),
            "keras": ("none", "float16")}
#: quantisations refused for a format with a reason, not only the list of what it takes
WHY_NOT = {("onnx", "dynamic"): "onnxruntime's dynamic quantisation turns this U-Net's convolutions into integer "
                                "kernels that ran slower than float32 and changed the bundled model's masks and "
                                "classes (README, dermtool export); export onnx with --quantize none, or tflite with "
                                "--quantize mixed for an int8 model"}
#: what `dermtool export --format` takes: the FORMATS, and keras (a model folder again, `write_keras`)
EXPORT_FORMATS = (*FORMATS, "keras")
#: --engine choices; a model folder converted for litert/onnx uses this quantisation
ENGINES = ("keras", "litert", "onnx", "savedmodel")
ENGINE_QUANTIZE = {"litert": "dynamic", "onnx": "none", "savedmodel": "none"}
_ENGINE_OF_FORMAT = {"tflite": "litert", "onnx": "onnx", "savedmodel": "savedmodel"}
INPUT_NAME = "image"
#: TFLite models are written for a fixed batch: with a free batch dimension the transposed
#: convolutions compute their output shape at run time, which splits the graph and keeps
#: XNNPACK's quantised kernels out (dynamic-range int8 ran 6x slower that way).
TFLITE_BATCH = 1
#: a joint model's TFLite export also holds its encoder + classifier alone, for the lesion view
CLASSIFIER_FILE = "classifier.tflite"
EXTRAS = {"litert": "litert", "onnx": "onnx"}


# --------------------------------------------------------------------------- Keras model folders


def default_model_dir() -> Path:
    """The bundled default model: installed package data, else the checkout's weights/."""
    here = Path(__file__).resolve().parent
    for root in (here / "weights", here.parent / "weights"):
        if root.is_dir():
            for cand in sorted(root.iterdir()):
                if (cand / "config.json").is_file():
                    return cand
    raise InputError("no bundled model found (weights/ is empty); pass --model RUN_DIR.")


def weights_file(run_dir: Path) -> Path:
    """The weights a model folder is used with: best epoch of a run, or a bundled model."""
    run_dir = Path(run_dir)
    for name in WEIGHT_NAMES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise InputError(f"{run_dir}: no weights (best.weights.h5 or model.weights.h5) in this folder.")


def load_model(model_dir: Path):
    """Rebuild the Keras network from `config.json` and load its weights; returns (model, config)."""
    from dermtool.models import build_model

    cfg, _, _ = load_config(model_dir)
    model = build_model(cfg)
    path = weights_file(model_dir)
    try:
        # Keras warns once per layer it cannot match (84 lines for a foreign file) before it raises
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            model.load_weights(str(path))
    except Exception as exc:  # h5 mismatch: wrong architecture or a damaged file
        damage = _unreadable_h5(path)
        if damage:
            raise InputError(f"{path}: not a readable weights file, damaged or cut short ({damage}).") from None
        raise InputError(f"{path}: weights do not fit the model in config.json ({_mismatch(exc)}).") from None
    return model, cfg


def _unreadable_h5(path: Path) -> str:
    """Why h5py cannot open `path` as an HDF5 file, in a few words ("" when it can)."""
    import h5py

    try:
        with h5py.File(path, "r"):
            return ""
    except Exception as exc:  # OSError for a truncated or foreign file
        return _short(exc)


def _mismatch(exc: Exception) -> str:
    """Keras's load error in a few words: the first layer that does not fit and both shapes."""
    text = str(exc)
    layer = re.search(r"object <\w+ name=([^,>]+)", text)
    shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", text)
    if not (layer and shapes):
        return _short(exc)
    count = re.search(r"A total of (\d+) objects", text)
    others = f", and {int(count[1]) - 1} other layers differ" if count and int(count[1]) > 1 else ""
    return (f"layer {layer[1]} has shape {shapes[2]} in the file but {shapes[1]} in the model{others}: "
            "the weights of another architecture")


def save_model_folder(run_dir: Path, out_dir: Path) -> Path:
    """Copy a run's best epoch into a slim model folder (config.json + model.weights.h5).

    Checkpoints carry the optimizer's slots too (three times the weights' size); a model
    folder for inference needs only the network.
    """
    model, cfg = load_model(run_dir)
    _, tcfg, _ = load_config(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.save_weights(str(out_dir / "model.weights.h5"))
    except RuntimeError as exc:  # h5py's word for a full disk
        raise as_disk_full(exc, out_dir / "model.weights.h5") from None
    from dermtool.checkpoint import read_state

    state = read_state(run_dir) or {}
    save_config(out_dir / "config.json", cfg, tcfg, best_epoch=state.get("best_epoch"),
                best_metric=state.get("best_metric"))
    return out_dir


# --------------------------------------------------------------------------- engines


class KerasEngine:
    """The Keras network of a model folder (the reference every export is compared with)."""

    name = "keras"

    def __init__(self, model_dir: Path):
        self.model, self.cfg = load_model(model_dir)
        self.path = weights_file(Path(model_dir))
        self._classifier = None

    def predict_on_batch(self, x: np.ndarray) -> dict:
        return {k: np.asarray(v, np.float32) for k, v in self.model.predict_on_batch(x).items()}

    def classify(self, x: np.ndarray) -> dict:
        """{"cls": class probabilities} through the encoder and classifier only (models.classifier_model:
        the same weights as `predict_on_batch`, without the mask decoder), for the lesion view's crops."""
        if self._classifier is None:
            from dermtool.models import classifier_model

            self._classifier = classifier_model(self.model)
            if self._classifier is None:
                raise InputError(f"{self.path}: not a joint model; it has no classifier of its own to run.")
        return {"cls": np.asarray(self._classifier.predict_on_batch(x)["cls"], np.float32)}


def _litert_interpreter():
    """LiteRT's interpreter (ai-edge-litert), else TensorFlow's own deprecated tf.lite one."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    from dermtool import _tf as tf_import

    # removed in a later TF; and no TensorFlow at all under another Keras backend
    interpreter = getattr(getattr(tf_import.load(), "lite", None), "Interpreter", None)
    if interpreter is None:
        _missing("litert", "ai-edge-litert")
    return interpreter


class LiteRTEngine:
    """A .tflite model run by LiteRT with its default XNNPACK delegate on all cores.

    The file is written for one image (TFLITE_BATCH); a batch of any length runs as one call,
    the signature runner resizing the input (the same outputs as image by image, and faster).

    An interpreter holds one set of input and output buffers, so two threads running it at once
    get each other's answers: every call takes the engine's lock, and its outputs are copied out
    of the buffers before the lock is let go.
    """

    name = "litert"

    def __init__(self, path: Path, cfg: ModelConfig, classifier: Path | None = None):
        self.cfg, self.path = cfg, path
        self._lock = threading.Lock()
        self._runner, self.input_name = self._open(path, cfg, {n for n, on in (("seg", cfg.has_seg), ("cls", cfg.has_cls)) if on})
        if classifier is not None:  # a joint export's encoder + classifier alone: the lesion view's second look
            self._classifier, self._classifier_input = self._open(classifier, cfg, {"cls"})
            self.classify = self._classify

    @staticmethod
    def _open(path: Path, cfg: ModelConfig, outputs: set):
        Interpreter = _litert_interpreter()
        try:
            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                interp = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
                runner = interp.get_signature_runner()
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"{path}: not a readable TFLite model ({_short(exc)}).")
        inputs = runner.get_input_details()
        name, detail = next(iter(inputs.items()))
        _check_io(path, cfg, list(inputs), [int(s) for s in detail["shape"][1:]],
                  list(runner.get_output_details()), outputs)
        try:
            with _quiet():  # the delegate announces itself on the first call
                runner(**{name: np.zeros(detail["shape"], np.float32)})  # a black image: any model must run it
        except RuntimeError as exc:  # a kernel refused (an int8 division by its zero point, say)
            first = " ".join(str(exc).split()).split("failed to invoke.")[0]  # LiteRT repeats it, once per try
            raise InputError(f"{path}: LiteRT cannot run this model on a black image ({first.strip()[:200]}).") from None
        return runner, name

    def _run(self, x: np.ndarray) -> dict:
        with self._lock:
            return {k: np.array(v, np.float32) for k, v in self._runner(**{self.input_name: x}).items()}

    def predict_on_batch(self, x: np.ndarray) -> dict:
        return self._run(np.ascontiguousarray(x, dtype=np.float32))

    def _classify(self, x: np.ndarray) -> dict:
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:  # the classifier's interpreter is the engine's too
            return {"cls": np.array(self._classifier(**{self._classifier_input: x})["cls"], np.float32)}


class OnnxEngine:
    """A .onnx model run by onnxruntime on the CPU."""

    name = "onnx"

    def __init__(self, path: Path, cfg: ModelConfig):
        try:
            import onnxruntime as ort
        except ImportError:
            _missing("onnx", "onnxruntime")
        self.cfg, self.path = cfg, path
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own (InvalidProtobuf, Fail, ...) types
            raise InputError(f"{path}: not a readable ONNX model ({_short(exc)}).")
        inputs = self._session.get_inputs()
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.input_name = inputs[0].name
        _check_io(path, cfg, [i.name for i in inputs], list(inputs[0].shape[1:]), self._outputs)

    def predict_on_batch(self, x: np.ndarray) -> dict:
        out = self._session.run(self._outputs, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self._outputs, out))


class SavedModelEngine:
    """A TensorFlow SavedModel's serving signature."""

    name = "savedmodel"

    def __init__(self, path: Path, cfg: ModelConfig):
        _check_savedmodel_trusted(path)
        tf = _tf()
        self.cfg, self.path = cfg, path
        try:
            with _quiet():
                self._fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        except Exception as exc:  # a damaged protobuf or a folder without the signature
            raise InputError(f"{path}: not a readable SavedModel ({_short(exc)}).")
        spec = next(iter(self._fn.structured_input_signature[1].values()))
        self.input_name = next(iter(self._fn.structured_input_signature[1]))
        _check_io(path, cfg, [self.input_name], list(spec.shape[1:]), list(self._fn.structured_outputs))

    def predict_on_batch(self, x: np.ndarray) -> dict:
        out = self._fn(**{self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return {k: v.numpy() for k, v in out.items()}


_ENGINE_CLASSES = {"litert": LiteRTEngine, "onnx": OnnxEngine, "savedmodel": SavedModelEngine}

#: A SavedModel's graph is a program: its ops may read and write any file the user can. One runs
#: only if dermtool wrote it (this process's exports, the engine cache), or with this set to 1.
TRUST_SAVEDMODEL_ENV = "DERMTOOL_TRUST_SAVEDMODEL"
_WRITTEN_SAVEDMODELS: set = set()


def trust_written_savedmodel(path: Path) -> None:
    """Let this process run the SavedModel dermtool wrote at `path` (an export moved into place)."""
    _WRITTEN_SAVEDMODELS.add(str(Path(path).resolve()))


def savedmodel_trusted(path: Path) -> bool:
    """Whether dermtool may run the SavedModel at `path`: it wrote it (this process, or its engine
    cache), or the user said so (TRUST_SAVEDMODEL_ENV=1)."""
    where = Path(path).resolve()
    return (os.environ.get(TRUST_SAVEDMODEL_ENV) == "1" or str(where) in _WRITTEN_SAVEDMODELS
            or cache_dir().resolve() in where.parents)


def _check_savedmodel_trusted(path: Path) -> None:
    """Refuse a SavedModel dermtool did not write, unless the user said it is trusted."""
    if not savedmodel_trusted(path):
        raise InputError(f"{path}: a SavedModel runs its own TensorFlow graph, which can read and write files, so "
                         f"dermtool runs one only from a source you trust: set {TRUST_SAVEDMODEL_ENV}=1 to run it, or "
                         "run the Keras model folder it was exported from (--engine savedmodel converts it itself).")


def _check_io(path: Path, cfg: ModelConfig, inputs: list, shape: list, outputs: list, expected: set | None = None) -> None:
    """A foreign model (other inputs or outputs than config.json describes) is refused by name."""
    s = cfg.input_size
    if expected is None:
        expected = {n for n, on in (("seg", cfg.has_seg), ("cls", cfg.has_cls)) if on}
    if len(inputs) != 1 or shape != [s, s, 3] or set(outputs) != expected:
        raise InputError(
            f"{path}: not the model its config.json describes (expects one {s}x{s}x3 input and outputs "
            f"{', '.join(sorted(expected))}; found inputs {inputs} of shape {shape}, outputs {sorted(outputs)}).")


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:160] + ("..." if len(text) > 160 else "")


def _missing(extra: str, package: str):
    raise InputError(f"this engine needs {package}: pip install 'dermtool[{extra}]'.")


def _tf():
    """TensorFlow, which export and the SavedModel engine need whatever Keras's backend is."""
    from dermtool import _tf

    tf = _tf.load()
    if tf is None:
        raise InputError(f"this needs TensorFlow, and KERAS_BACKEND is {_tf.backend()}: export and the "
                         "SavedModel engine run under TensorFlow only (unset KERAS_BACKEND).")
    return tf


def _quiet():
    from dermtool import _tf

    return _tf.quiet()


def resolve_model(path: Path | None) -> tuple[Path, Path | None, str]:
    """(folder with config.json, exported model file or None, format: keras|tflite|onnx|savedmodel).

    `path` may be a model folder, an export folder, or an exported file (.tflite, .onnx) whose
    config.json lies beside it; None is the bundled model.
    """
    if path is None:
        return default_model_dir(), None, "keras"
    path = Path(path)
    if path.is_file():
        fmt = {".tflite": "tflite", ".onnx": "onnx"}.get(path.suffix.lower())
        if fmt is None:
            raise InputError(f"{path}: not a model (give a model folder, an export folder, a .tflite or .onnx file).")
        if not (path.parent / "config.json").is_file():
            raise InputError(f"{path}: no config.json beside it; write exports with dermtool export.")
        return path.parent, path, fmt
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: no such model folder or file.")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model folder (no config.json).")
    _, _, raw = load_config(path)
    export = raw.get("export")
    if not export:
        return path, None, "keras"
    fmt = export.get("format")
    if fmt not in FORMATS:
        raise InputError(f"{path / 'config.json'}: unknown export format {fmt!r}.")
    file = export.get("file", FORMATS[fmt])
    if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file:
        raise InputError(f"{path / 'config.json'}: export.file must name a file inside the export folder, "
                         f"not {str(file)[:60]!r}.")
    return path, path / file, fmt


def load_engine(path: Path | None = None, engine: str | None = None, log=None):
    """Open a model for inference; see the module docstring.

    Args:
        path: model folder, export folder or exported file; None: the bundled model.
        engine: None (the model's own runtime), or "keras", "litert", "onnx", "savedmodel". A
            Keras model folder asked for another engine uses the export it carries for it
            (`shipped_export`), else is converted once (ENGINE_QUANTIZE) and kept in the user
            cache (`cache_dir()`), keyed by the folder's config and weights.
        log: called with a line when a conversion runs, or a carried export is stale.
    """
    folder, file, fmt = resolve_model(path)
    own = "keras" if fmt == "keras" else _ENGINE_OF_FORMAT[fmt]
    engine = engine or own
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}.")
    if engine == own and fmt == "keras":
        return KerasEngine(folder)
    if engine != own:
        if fmt != "keras":
            raise InputError(f"{file}: a {fmt} export runs on the {own} engine, not {engine}.")
        shipped = shipped_export(folder, engine)
        if shipped is None and (folder / engine / "config.json").is_file() and log:
            try:
                held = read_json(folder / engine / "config.json", "config").get("export", {}).get("format")
            except (InputError, AttributeError):
                held = None
            why = (f"it holds a {held} export, not one the {engine} engine runs" if isinstance(held, str)
                   and held in _ENGINE_OF_FORMAT and _ENGINE_OF_FORMAT[held] != engine else
                   f"it was exported from another state of {folder} (its weights or config.json changed since)")
            log(f"not using {folder / engine}: {why}; using a conversion of the model instead")
        if engine == "savedmodel" and shipped is not None and not savedmodel_trusted(shipped / FORMATS["savedmodel"]):
            if log:  # the weights are data; the SavedModel beside them is a program from wherever the folder came
                log(f"not running {shipped}: a SavedModel dermtool did not write (set {TRUST_SAVEDMODEL_ENV}=1 to "
                    "run it); converting the weights instead")
            shipped = None
        folder, file, fmt = resolve_model(shipped or cached_export(folder, engine, log))
    cfg, _, raw = load_config(folder)
    if not file.exists():
        raise InputError(f"{file}: missing; its export folder {folder} is incomplete.")
    if not (file.is_dir() if fmt == "savedmodel" else file.is_file()):  # a FIFO there would hang the engine's open
        raise InputError(f"{file}: not a {'folder' if fmt == 'savedmodel' else 'regular file'}; its export folder "
                         f"{folder} is damaged.")
    if engine == "litert":
        return LiteRTEngine(file, cfg, _classifier_file(folder, raw))
    return _ENGINE_CLASSES[engine](file, cfg)


def _classifier_file(folder: Path, raw: dict) -> Path | None:
    """The export's classifier-only TFLite file (CLASSIFIER_FILE), if its config.json lists one."""
    export = raw.get("export") if isinstance(raw.get("export"), dict) else {}
    entry = export.get("classifier")
    if entry is None:
        return None
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise InputError(f"{folder / 'config.json'}: export.classifier.file must name a file inside the export "
                         f"folder, not {str(name)[:60]!r}.")
    if not (folder / name).is_file():
        raise InputError(f"{folder / name}: missing; its export folder {folder} is incomplete.")
    return folder / name


# --------------------------------------------------------------------------- writing exports


def _input_spec(cfg: ModelConfig, batch: int | None):
    tf = _tf()
    return tf.TensorSpec([batch, cfg.input_size, cfg.input_size, 3], tf.float32, name=INPUT_NAME)


def _write_savedmodel(model, cfg: ModelConfig, dest: Path, batch: int | None = None) -> None:
    with _quiet():
        model.export(str(dest), format="tf_saved_model", verbose=False, input_signature=[_input_spec(cfg, batch)])
    trust_written_savedmodel(dest)  # export's own check may load it


def _write_tflite(model, cfg: ModelConfig, dest: Path, quantize: str, calibration: np.ndarray | None) -> None:
    tf = _tf()
    with tempfile.TemporaryDirectory() as tmp:
        _write_savedmodel(model, cfg, Path(tmp) / "sm", TFLITE_BATCH)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "sm"))
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if quantize in ("int8", "mixed"):  # input and outputs stay float32 so engines need no scales
            converter.representative_dataset = lambda: ([x[None].astype(np.float32)] for x in calibration)
        with _quiet():
            if float_layers(cfg, quantize):
                dest.write_bytes(_mixed_int8(converter, _float_nodes(Path(tmp) / "sm", cfg, quantize), calibration))
            else:
                dest.write_bytes(converter.convert())


def shown_path(path: Path) -> str:
    """A path as recorded in config.json: relative to the working folder when inside it or
    beside it (../shared/...), else absolute."""
    rel = os.path.relpath(Path(path).resolve(), Path.cwd())
    return rel if not rel.startswith(os.pardir + os.sep + os.pardir) else str(Path(path).resolve())


def float_layers(cfg: ModelConfig, quantize: str) -> tuple:
    """Prefixes of the layers an int8 export keeps in float32 (none for the other quantisations).

    Colour constancy always: it divides by each channel's p-norm mean, and in int8 a dark channel's
    mean rounds to the zero point, so the division fails at run time (TFLite's DIV refuses a zero
    divisor: the bundled model's full-int8 file, calibrated on 40 ISIC 2017 training images, failed
    on a black image and on 16 of the 2,000 training images) and a bright one's gain is rounded.
    `mixed` adds MIXED_FLOAT_LAYERS.
    """
    from dermtool.models import MIXED_FLOAT_LAYERS

    if quantize not in ("int8", "mixed"):
        return ()
    extra = ("color_constancy",) if cfg.color_constancy != "none" else ()
    return extra + (MIXED_FLOAT_LAYERS[cfg.encoder] if quantize == "mixed" else ())


def _float_nodes(saved_model: Path, cfg: ModelConfig, quantize: str) -> list[str]:
    """TFLite tensor names of the layers an int8 export keeps in float32 (`float_layers`).

    A converted op's tensor is named by the Keras layers fused into it
    ("model/enc_stem_relu_1/Relu6;model/enc_stem_conv_1/convolution"), so a path component
    that starts with a listed prefix marks it.
    """
    prefixes = float_layers(cfg, quantize)
    float_model = _tf().lite.TFLiteConverter.from_saved_model(str(saved_model)).convert()
    interpreter = _litert_interpreter()(model_content=float_model)
    names = [t["name"] for t in interpreter.get_tensor_details()]
    chosen = [n for n in names if any(part.startswith(prefixes) for part in n.replace(";", "/").split("/"))]
    if not chosen:
        raise RuntimeError(f"--quantize {quantize}: no layer of this model starts with {', '.join(prefixes)}")
    return chosen


def _mixed_int8(converter, float_nodes: list[str], calibration: np.ndarray) -> bytes:
    """Full-int8 conversion except `float_nodes`, which stay float32 (TFLite's selective
    quantisation, done through its quantisation debugger's denylist)."""
    tf = _tf()
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=float_nodes)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: iter([[calibration[:1].astype(np.float32)]]),
        debug_options=options)
    return debugger.get_nondebug_quantized_model()


def _write_onnx(model, cfg: ModelConfig, dest: Path) -> None:
    tf = _tf()
    try:
        import tf2onnx
    except ImportError:
        _missing("onnx", "tf2onnx")
    fn = tf.function(lambda image: model(image, training=False))
    with _quiet():
        tf2onnx.convert.from_function(fn, input_signature=[_input_spec(cfg, None)], opset=17,
                                      output_path=str(dest))


def check_format(fmt: str, quantize: str, calibrated: bool) -> None:
    """Refuse a format, a quantisation it does not take, or int8/mixed without calibration images."""
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}.")
    if (fmt, quantize) in WHY_NOT:
        raise InputError(f"--quantize {quantize} is not available for {fmt}: {WHY_NOT[(fmt, quantize)]}.")
    if quantize not in QUANTIZE[fmt]:
        raise InputError(f"--quantize {quantize} is not available for {fmt} (choose {', '.join(QUANTIZE[fmt])}).")
    if quantize in ("int8", "mixed") and not calibrated:
        raise InputError(f"--quantize {quantize} needs calibration images: pass --calibration DIR.")


def write_export(model_dir: Path, out_dir: Path, fmt: str, quantize: str = "none",
                 calibration: np.ndarray | None = None, calibration_from: str | None = None) -> Path:
    """Write `out_dir`: the model in `fmt` (FORMATS) plus a config.json that describes it.

    Args:
        model_dir: a Keras model folder.
        quantize: one of QUANTIZE[fmt]; "int8" and "mixed" need `calibration`, model inputs
            (N, s, s, 3); `calibration_from` (where they came from) is recorded in config.json.
    Returns: the path of the written model file (or SavedModel folder).
    """
    check_format(fmt, quantize, calibration is not None and len(calibration) > 0)
    model, cfg = load_model(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / FORMATS[fmt]
    if dest.is_dir():
        shutil.rmtree(dest)
    if fmt == "savedmodel":
        _write_savedmodel(model, cfg, dest)
    elif fmt == "tflite":
        _write_tflite(model, cfg, dest, quantize, calibration)
        from dermtool.models import classifier_model

        classifier = classifier_model(model)
        if classifier is not None:  # the lesion view's second look, without the mask decoder
            _write_tflite(classifier, cfg, out_dir / CLASSIFIER_FILE, quantize, calibration)
        else:  # an earlier joint model's file in a reused folder would be of other weights
            (out_dir / CLASSIFIER_FILE).unlink(missing_ok=True)
    else:
        _write_onnx(model, cfg, dest)
    _, tcfg, raw = load_config(model_dir)
    save_config(out_dir / "config.json", cfg, tcfg, export=export_description(cfg, fmt, quantize, model_dir, calibration, calibration_from),
                **{k: raw[k] for k in ("best_epoch", "best_metric") if k in raw})
    return dest


def write_keras(model_dir: Path, out_dir: Path, quantize: str = "none") -> Path:
    """Write `out_dir` as a model folder of its own: `model_dir`'s config.json and weights
    (model.weights.h5), the weights stored as float16 with quantize="float16".

    float16 halves the file; Keras casts the values back to the float32 variables when it loads
    them, so the model computes in float32 as before, on weights rounded to 11 significant bits
    (`dermtool export` then prints what that changes in the outputs). The folder carries no
    exports: a carried litert/ was written from the other weights (export it again from here).
    Its config.json records the source and its sha1 under "copied_from".

    Returns: `out_dir`.
    """
    check_format("keras", quantize, False)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg, tcfg, raw = load_config(model_dir)
    # loaded first: weights that do not fit their config.json are refused before anything is written
    model, _ = load_model(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / "model.weights.h5"
    try:  # the network alone: a run's checkpoint also holds the optimizer's slots, twice its size
        model.save_weights(str(dest))
    except RuntimeError as exc:  # h5py's word for a full disk
        raise as_disk_full(exc, dest) from None
    kept = {k: v for k, v in raw.items() if k not in ("model", "train", "export", "weights_dtype", "copied_from")}
    dtype = "float16" if quantize == "float16" else raw.get("weights_dtype", "float32")
    if dtype == "float16":  # asked for, or kept: the source stored its weights so
        halve_weights(dest)
    save_config(out_dir / "config.json", cfg, tcfg, **kept, weights_dtype=dtype,
                copied_from={"source": shown_path(model_dir), "source_sha1": model_fingerprint(model_dir),
                             "quantize": quantize, "dermtool_version": __version__})
    return out_dir


def halve_weights(path: Path) -> None:
    """Rewrite a Keras weights file with its float32 arrays stored as float16 (half the size).

    Keras casts them back to the variables' float32 when it loads the file.
    """
    import h5py

    path = Path(path)
    tmp = path.with_name(path.name + ".half")
    with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                dst.create_dataset(name, data=data.astype(np.float16) if data.dtype == np.float32 else data)
            else:
                group = dst.require_group(name)
                for key, value in obj.attrs.items():
                    group.attrs[key] = value

        src.visititems(copy)
    tmp.replace(path)


def export_description(cfg: ModelConfig, fmt: str, quantize: str, source: Path,
                       calibration: np.ndarray | None = None, calibration_from: str | None = None) -> dict:
    """The "export" section of config.json: enough to run the file without dermtool, and where
    it came from (the model folder and its sha1, the calibration images)."""
    batch = TFLITE_BATCH if fmt == "tflite" else None
    s = cfg.input_size
    outputs = {}
    if cfg.has_seg:
        outputs["seg"] = {"shape": [batch, s, s, 1], "meaning": "lesion probability per pixel; lesion where > threshold"}
    if cfg.has_cls:
        outputs["cls"] = {"shape": [batch, len(cfg.class_names)], "meaning": "class probabilities (softmax)",
                          "classes": list(cfg.class_names)}
    return {
        "format": fmt, "file": FORMATS[fmt], "quantize": quantize, "source": shown_path(source),
        "source_sha1": model_fingerprint(source),
        **({"calibration": {"images": int(len(calibration)), "from": calibration_from}}
           if quantize in ("int8", "mixed") and calibration is not None else {}),
        **({"float32_layers": list(float_layers(cfg, quantize))} if float_layers(cfg, quantize) else {}),
        "dermtool_version": __version__,
        "input": {"name": INPUT_NAME, "shape": [batch, s, s, 3], "dtype": "float32", "layout": "NHWC",
                  "values": f"RGB 0-255, not normalised: the model applies {cfg.normalization} itself"},
        "geometry": {"fit": cfg.fit, "size": cfg.size, "margin": cfg.margin, "border": cfg.border,
                     "how": "squash: resize the whole image to size x size; pad: keep the aspect ratio "
                            "and zero-pad to a square (plus border); then a reflected margin on each side"},
        "outputs": outputs, "threshold": cfg.threshold, "class_names": list(cfg.class_names),
        **({"decision": _decision(cfg)} if cfg.has_cls else {}),
        **({"classifier": {"file": CLASSIFIER_FILE, "outputs": {"cls": outputs["cls"]},
                           "meaning": "the same network without the mask decoder (the same input; class "
                                      "probabilities only): the lesion view's second look"}}
           if fmt == "tflite" and cfg.has_seg and cfg.has_cls else {}),
    }


def _decision(cfg: ModelConfig) -> dict:
    from dermtool.decision import describe

    return describe(cfg.temperature, cfg.melanoma_threshold)


# --------------------------------------------------------------------------- conversion cache


def cache_dir() -> Path:
    """Where converted copies of model folders are kept: $DERMTOOL_CACHE_DIR, else ~/.cache/dermtool."""
    env = os.environ.get("DERMTOOL_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dermtool"
    return base / "engines"


def model_fingerprint(model: Path | None, config: bool = True, config_text: str | None = None) -> str:
    """sha1 of config.json and the weights (or the exported file): the same model wherever it lies.

    config=False: of the weights alone, which calibrating (a new temperature and threshold in
    config.json) leaves as they were. config_text: the fingerprint the folder will have once its
    config.json holds this text."""
    folder, file, fmt = resolve_model(model)
    h = hashlib.sha1()
    if config_text is not None:
        h.update(config_text.encode())
    if config and config_text is None:
        _hash_file(h, folder / "config.json")
    return file_fingerprint(weights_file(folder) if fmt == "keras" else file, h)


def file_fingerprint(path: Path, h=None) -> str:
    """sha1 of a model file, or of every file of a folder (a SavedModel) in name order; `h`: a
    hash to continue."""
    h = h or hashlib.sha1()
    for part in sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]:
        _hash_file(h, part)
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def shipped_export(model_dir: Path, engine: str) -> Path | None:
    """The export a model folder carries for `engine` (MODEL/<engine>/, e.g. the bundled model's
    calibrated mixed-int8 litert/), if it was written from these very weights; else None."""
    folder = Path(model_dir) / engine
    if not (folder / "config.json").exists():
        return None
    try:
        export = read_json(folder / "config.json", "config")["export"]
    except (InputError, KeyError):  # not an export, or damaged: convert the folder instead
        return None
    if not isinstance(export, dict):  # a damaged carried export: converted afresh instead
        return None
    if _ENGINE_OF_FORMAT.get(export.get("format")) != engine or export.get("source_sha1") != model_fingerprint(model_dir):
        return None
    # the same network's description, decision included (calibrate writes both): an export that says
    # otherwise would run in the model's name with another temperature or threshold
    try:
        same = read_json(folder / "config.json", "config").get("model") == read_json(
            Path(model_dir) / "config.json", "config").get("model")
    except InputError:
        return None
    return folder if same else None


def cached_export(model_dir: Path, engine: str, log=None) -> Path:
    """The export folder of `model_dir` for `engine`, converted on first use and then reused."""
    fmt = {v: k for k, v in _ENGINE_OF_FORMAT.items()}[engine]
    quantize = ENGINE_QUANTIZE[engine]
    digest = hashlib.sha256(f"{__version__} {fmt} {quantize} {model_fingerprint(model_dir)}".encode())
    target = cache_dir() / f"{Path(model_dir).name}-{fmt}-{quantize}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    if log:
        log(f"converting {model_dir} for the {engine} engine ({fmt}, quantize {quantize}); once, kept in {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    except OSError as exc:  # not infer's --out: the cache, which the user may move elsewhere
        from dermtool.errors import write_failure

        said = write_failure(exc, f"the engine cache, where the {engine} conversion of {model_dir} is kept",
                             target.parent)
        raise InputError(f"{said.rstrip('.')}; set DERMTOOL_CACHE_DIR to a folder you can write.") from None
    try:
        write_export(model_dir, tmp, fmt, quantize)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

