"""Networks built from a ModelConfig with the Keras Functional API.

The encoder is built once and shared: `build_model` puts the segmentation head (U-Net decoder),
the classification head, or both (joint) on the same encoder tensors. Every layer is named
(`enc_block2_conv1`, `dec_block1_up`, `seg_head`, `cls_dense`) so weights can be moved between
variants by name (`--init-from`).
"""

from __future__ import annotations

import dataclasses

from dermtool import _tf

_tf.load()

import keras  # noqa: E402  (after the quiet TensorFlow import)
from keras import layers, ops  # noqa: E402

from dermtool.config import ModelConfig
from dermtool.errors import InputError

SEG_OUTPUT = "seg"
CLS_OUTPUT = "cls"


def _conv_block(x, filters: int, cfg: ModelConfig, name: str, dropout: float = 0.0):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding=cfg.padding, use_bias=not cfg.batch_norm,
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        if cfg.batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
        if i == 1 and dropout:
            x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


#: Keras layer-name prefixes that `dermtool export --quantize mixed` keeps in float32, by encoder:
#: the input normalisation and the encoder's first, full-resolution stage. On the bundled model,
#: int8 there is most of the damage full int8 does: the per-layer int8 error (TFLite's
#: quantisation debugger, RMSE over the quantisation step) is 3.7 and 6.0 in the stem and the first
#: depthwise convolution against about 0.3 everywhere else, and the quantised normalisation costs
#: the rest. Full int8 changed the class of 19 of the 150 ISIC 2017 validation images and 95 of
#: the ~900 HAM10000 holdout images; these layers in float32, 1 and 18, about what dynamic-range
#: int8 does (1 and 20), at full int8's speed (bench/export_bench.py).
MIXED_FLOAT_LAYERS = {
    "efficientnet-lite0": ("normalize", "enc_stem_", "enc_mb0_"),
    "efficientnet-lite1": ("normalize", "enc_stem_", "enc_mb0_"),
    "efficientnet-lite2": ("normalize", "enc_stem_", "enc_mb0_"),
    "unet": ("normalize", "enc_block1_"),
}


@keras.saving.register_keras_serializable(package="dermtool")
class ShadesOfGray(layers.Layer):
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004) on 0-255 RGB, per image.

    The illuminant of each channel is its Minkowski p-norm mean, e_c = mean(I_c^p)^(1/p)
    (p = 1 is Gray World, p -> inf is White Patch; p = 6 is what the top ISIC 2018-2019 entries
    used). Each channel is scaled by mean(e) / e_c, so the illuminant becomes grey while the
    overall brightness stays, and clipped to 0-255. Inside the network, so training, `infer`
    and every export apply exactly the same correction.
    """

    def __init__(self, p: float = 6.0, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)

    def call(self, x):
        from keras import ops

        unit = ops.maximum(x / 255.0, 0.0)
        e = ops.power(ops.mean(ops.power(unit, self.p), axis=(1, 2), keepdims=True) + 1e-12, 1.0 / self.p)
        gain = ops.mean(e, axis=-1, keepdims=True) / ops.maximum(e, 1e-6)
        return ops.clip(x * gain, 0.0, 255.0)

    def get_config(self):
        return {**super().get_config(), "p": self.p}


def _normalize(x, cfg: ModelConfig):
    """Model input is raw 0-255 RGB; normalisation lives inside the model so it is never skipped."""
    if cfg.normalization == "divide255":
        return layers.Rescaling(1.0 / 255.0, name="normalize")(x)
    if cfg.normalization == "center":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(x)
    if cfg.normalization == "lite":  # what the ImageNet Lite weights were trained on
        from dermtool.pretrained import lite0_normalize

        return lite0_normalize(x)
    raise ValueError(f"unknown normalization {cfg.normalization!r}")


def build_encoder(cfg: ModelConfig):
    """Input tensor, list of skip tensors (fine to coarse) and the bottleneck tensor."""
    inputs = keras.Input((cfg.input_size, cfg.input_size, 3), name="image")
    x = ShadesOfGray(6.0, name="color_constancy")(inputs) if cfg.color_constancy == "shades-of-gray" else inputs
    x = _normalize(x, cfg)
    if cfg.encoder.startswith("efficientnet-lite"):
        from dermtool.pretrained import build_lite0_features

        # the Lite0 trunk gives skips at 1/2 .. 1/16 and 1280 features at 1/32; the full-resolution
        # skip is the normalised image itself, so the decoder's last level still sees pixels
        skips, bottleneck = build_lite0_features(x, cfg.encoder)
        return inputs, [x] + skips, bottleneck
    skips = []
    for level in range(cfg.depth):
        x = _conv_block(x, cfg.base_filters * 2**level, cfg, f"enc_block{level + 1}", cfg.dropout)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc_block{level + 1}_pool")(x)
    x = _conv_block(x, cfg.base_filters * 2**cfg.depth, cfg, "bottleneck", cfg.dropout)
    return inputs, skips, x


class SegHead:
    """The U-Net decoder's layers, made once and callable on any encoder tensors.

    Training with `--seg-batch` calls the same layers a second time, on the first images of each
    batch only, so the inference model and the training model share every weight.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg, self.blocks = cfg, []
        for level in reversed(range(cfg.depth)):
            filters, block = cfg.base_filters * 2**level, f"dec_block{level + 1}"
            convs = []
            for i in (1, 2):
                convs.append(layers.Conv2D(filters, 3, padding=cfg.padding, use_bias=not cfg.batch_norm,
                                           kernel_initializer="he_normal", name=f"{block}_conv{i}"))
                if cfg.batch_norm:
                    convs.append(layers.BatchNormalization(name=f"{block}_bn{i}"))
                convs.append(layers.Activation("relu", name=f"{block}_relu{i}"))
            self.blocks.append((level, block, layers.Conv2DTranspose(filters, 2, strides=2, name=f"{block}_up"),
                                layers.Concatenate(name=f"{block}_concat"), convs))
        # float32 output even under mixed precision: sigmoid and the loss need the range
        self.out = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=SEG_OUTPUT)
        self._crops = {}

    def __call__(self, skips, bottleneck):
        x = bottleneck
        for level, block, up, concat, convs in self.blocks:
            x = up(x)
            skip = skips[level]
            diff = skip.shape[1] - x.shape[1]
            if diff:  # valid convolutions: centre-crop the skip connection to the decoder's size
                name = f"{block}_crop"
                crop = self._crops.setdefault(name, layers.Cropping2D(diff // 2, name=name))
                skip = crop(skip)
            x = concat([skip, x])
            for layer in convs:
                x = layer(x)
        return self.out(x)


def build_seg_head(cfg: ModelConfig, skips, bottleneck):
    return SegHead(cfg)(skips, bottleneck)


def build_cls_head(cfg: ModelConfig, bottleneck):
    x = bottleneck
    if cfg.cls_head == "dense":  # the thesis head
        x = layers.MaxPooling2D(cfg.cls_pool_size, name="cls_pool")(x)
        x = layers.Flatten(name="cls_flatten")(x)
        x = layers.Dropout(0.5, name="cls_dropout1")(x)
        x = layers.Dense(cfg.cls_dense_units, activation="relu", name="cls_dense")(x)
        x = layers.Dropout(0.5, name="cls_dropout2")(x)
    elif cfg.cls_head == "linear":  # a pretrained encoder's features need only a linear read-out
        x = layers.GlobalAveragePooling2D(name="cls_avgpool")(x)
        x = layers.Dropout(0.3, name="cls_dropout1")(x)
    else:
        avg = layers.GlobalAveragePooling2D(name="cls_avgpool")(x)
        mx = layers.GlobalMaxPooling2D(name="cls_maxpool")(x)
        x = layers.Concatenate(name="cls_concat")([avg, mx])
        x = layers.Dropout(0.3, name="cls_dropout1")(x)
        x = layers.Dense(128, activation="relu", name="cls_dense")(x)
        x = layers.Dropout(0.3, name="cls_dropout2")(x)
    return layers.Dense(len(cfg.class_names), activation="softmax", dtype="float32", name=CLS_OUTPUT)(x)


class _FirstImages(layers.Layer):
    """The first `n` images of a batch (the training model of `--seg-batch`; never saved)."""

    def __init__(self, n: int, **kwargs):
        super().__init__(**kwargs)
        self.n = int(n)

    def call(self, x):
        return x[: self.n]

    def compute_output_shape(self, shape):
        return (None, *shape[1:])


def build_model(cfg: ModelConfig) -> keras.Model:
    """The seg, cls or joint network of `cfg.task` on one shared encoder.

    Outputs are a dict keyed by "seg" (N, size, size, 1 lesion probability) and/or "cls"
    (N, 3 class probabilities, order `cfg.class_names`).
    """
    return build_models(cfg)[0]


def build_models(cfg: ModelConfig, seg_batch: int = 0) -> tuple[keras.Model, keras.Model]:
    """The model (as `build_model`) and the one to train it through.

    With `seg_batch` > 0 on a joint model, the training model's decoder runs on the first
    `seg_batch` images of each batch only (its "seg" output has that many rows), while the encoder
    and classifier see them all: most of a joint step's cost is the full-size decoder, so each
    classifier update gets cheaper. Both models share every layer; the first is the one to
    validate and save. Otherwise both are the same object.
    """
    if cfg.members > 1:
        if seg_batch:
            raise InputError("an ensemble is not trained as one network: train each member, then join them "
                             "with dermtool ensemble.")
        ensemble = build_ensemble(cfg)
        return ensemble, ensemble
    inputs, skips, bottleneck = build_encoder(cfg)
    outputs, head = {}, None
    if cfg.has_seg:
        head = SegHead(cfg)
        outputs[SEG_OUTPUT] = head(skips, bottleneck)
    if cfg.has_cls:
        outputs[CLS_OUTPUT] = build_cls_head(cfg, bottleneck)
    model = keras.Model(inputs, outputs, name=f"dermtool_{cfg.preset}_{cfg.task}")
    if not seg_batch or head is None or not cfg.has_cls:
        return model, model
    take = _FirstImages(seg_batch, name="seg_batch")
    train_outputs = {**outputs, SEG_OUTPUT: head([take(t) for t in skips], take(bottleneck))}
    return model, keras.Model(inputs, train_outputs, name=f"dermtool_{cfg.preset}_{cfg.task}_train")


class _Mean(layers.Layer):
    """The mean of same-shaped tensors (weighted by `weights`, if given), as a stack and a mean over it.

    Not keras's Average or Add: at the export's batch of one, the TFLite converter folds a sum of
    two (1, 3) tensors into a bias add through a reshape fixed at that batch, which the LiteRT
    engine then cannot resize to a batch.
    """

    def __init__(self, weights=None, **kwargs):
        super().__init__(**kwargs)
        self.shares = None if weights is None else [float(w) / sum(weights) for w in weights]

    def call(self, xs):
        stacked = ops.stack(xs, axis=-1)
        if self.shares is None:
            return ops.mean(stacked, axis=-1)
        return ops.sum(stacked * ops.convert_to_tensor(self.shares, dtype=stacked.dtype), axis=-1)

    def compute_output_shape(self, shapes):
        return shapes[0]


def build_ensemble(cfg: ModelConfig) -> keras.Model:
    """`cfg.members` networks of one architecture on one input; each output the mean of theirs
    (weighted by `cfg.member_weights`, if set).

    Each member is the single network of `cfg` (its layers keep their names inside a sub-model
    `member_<i>`), so the weights of a trained model folder load into a member unchanged
    (`dermtool.ensemble`). The class probabilities are averaged, as are the lesion probabilities:
    everything downstream (threshold, temperature, lesion view, export) sees one model.
    """
    single = dataclasses.replace(cfg, members=1, member_weights=None)
    inputs = keras.Input((cfg.input_size, cfg.input_size, 3), name="image")
    nets = []
    for i in range(cfg.members):
        net = build_model(single)
        net.name = f"member_{i}"
        nets.append(net(inputs))
    outputs = {key: _Mean(cfg.member_weights, name=key, dtype="float32")([n[key] for n in nets]) for key in nets[0]}
    return keras.Model(inputs, outputs, name=f"dermtool_{cfg.preset}_{cfg.task}_ensemble{cfg.members}")


def classifier_model(model: keras.Model) -> keras.Model:
    """The encoder and classifier of a joint `model` as a network of their own (the same layers
    and weights, no mask decoder): a second look at an image needs only its class probabilities,
    and the full-size decoder is most of a joint pass. None for a model without both heads."""
    outputs = model.output
    if not isinstance(outputs, dict) or SEG_OUTPUT not in outputs or CLS_OUTPUT not in outputs:
        return None
    return keras.Model(model.input, {CLS_OUTPUT: outputs[CLS_OUTPUT]}, name=f"{model.name}_classifier")


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The member networks of an ensemble built by `build_ensemble`, in order."""
    return sorted((l for l in model.layers if l.name.startswith("member_")), key=lambda l: int(l.name[7:]))


def load_pretrained(model: keras.Model, cfg: ModelConfig, log=None) -> int:
    """Put the encoder's ImageNet weights into a freshly built model (cfg.pretrained)."""
    if not cfg.encoder.startswith("efficientnet-lite"):
        return 0
    from dermtool.pretrained import load_lite0_imagenet

    return load_lite0_imagenet(model, log=log, encoder=cfg.encoder)


def encoder_layer_names(model: keras.Model) -> list[str]:
    return [l.name for l in model.layers if l.name.startswith(("enc_", "bottleneck"))]


def encoder_of(model: keras.Model) -> str:
    """Which of ENCODERS a built model's layers are: the U-Net's own, or the EfficientNet-Lite whose
    blocks (their number and the last one's width) they have."""
    from dermtool.pretrained import LITE_STAGES

    names = {l.name for l in model.layers}
    if "enc_stem_conv" not in names:
        return "unet"
    blocks = sum(1 for n in names if n.startswith("enc_mb") and n.endswith("_project_conv"))
    last = model.get_layer(f"enc_mb{blocks - 1}_project_conv").filters
    for encoder, stages in LITE_STAGES.items():
        if sum(s[4] for s in stages) == blocks and stages[-1][3] == last:
            return encoder
    raise ValueError(f"an EfficientNet-Lite encoder of {blocks} blocks ending at width {last} is not one of "
                     f"{', '.join(LITE_STAGES)}")


def stem_layer_names(model: keras.Model) -> list[str]:
    """The encoder's first, full-resolution stage (the layers MIXED_FLOAT_LAYERS keeps in float32):
    frozen, no gradient flows through the largest feature maps, which makes a step cheaper."""
    prefixes = tuple(p for p in MIXED_FLOAT_LAYERS[encoder_of(model)] if p != "normalize")
    return [l.name for l in model.layers if l.name.startswith(prefixes)]


# --freeze early: the encoder up to its 1/4-resolution stage. With --seg-batch 4 it took a Lite0
# joint step from 1.53x to 1.92x the plain step's images/s on a CPU (bench/train_bench.py --recipes).
# An EfficientNet-Lite's: its stem and the blocks of its first two stages (pretrained.early_blocks).
EARLY_LAYERS = {"unet": ("enc_block1_", "enc_block2_")}


def early_layer_names(model: keras.Model) -> list[str]:
    """The encoder's stages at full, 1/2 and 1/4 resolution (`--freeze early`): a superset of
    stem_layer_names, so the skips at 1/2 and 1/4 keep their ImageNet (or earlier) features."""
    from dermtool.pretrained import LITE_STAGES, early_blocks

    encoder = encoder_of(model)
    prefixes = EARLY_LAYERS.get(encoder) or ("enc_stem_",) + tuple(
        f"enc_mb{i}_" for i in range(early_blocks(LITE_STAGES[encoder])))
    return [l.name for l in model.layers if l.name.startswith(prefixes)]


def decoder_layer_names(model: keras.Model) -> list[str]:
    return [l.name for l in model.layers if l.name.startswith("dec_") or l.name == SEG_OUTPUT]
