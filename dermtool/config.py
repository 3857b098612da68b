"""Frozen configuration dataclasses, saved as `config.json` beside a model's weights.

A model folder describes itself: inference rebuilds the network, its input geometry, the
normalisation and the post-processing from `config.json` alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from dermtool import CLASS_NAMES
from dermtool.errors import InputError

TASKS = ("seg", "cls", "joint")
ENCODERS = ("unet", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
PRESETS = ("thesis", "compact", "lite0")
FITS = ("pad", "squash")
COLOR_CONSTANCY = ("none", "shades-of-gray")
INPUT_CHAINS = ("direct", "jpeg256")  # dermtool.preprocess.CHAINS, without importing Pillow here
CLS_VIEWS = ("frame", "frame+lesion")  # what the classifier looks at in infer (dermtool.infer.predict_batch)
FREEZES = ("none", "encoder", "decoder", "encoder+decoder", "stem", "early")  # train --freeze (dermtool.train.apply_freeze)

#: the most networks `dermtool ensemble` joins (each one more forward pass of the whole network)
ENSEMBLE_MAX = 8
_MEMORY = "memory grows with its square: 1024 px at batch 16 already needs tens of GB"
#: The architecture's numbers: key -> (lowest, highest, why). `train` checks its options
#: against these, and a config.json is refused outside them (`check_model_section`).
MODEL_RANGES = {
    "size": (32, 1024, f"pixels of the square the model predicts; {_MEMORY}"),
    "base_filters": (1, 256, "channels of the first level, doubled at each level; memory and time grow with "
                             "their square"),
    "depth": (1, 7, "pooling levels, each halving the square; the size must be a multiple of 2**depth"),
    "cls_pool_size": (1, 64, "the pooling window of the thesis's dense classifier head"),
    "cls_dense_units": (1, 8192, "units of the thesis's dense classifier head"),
    "members": (1, ENSEMBLE_MAX, "networks of one architecture whose outputs an ensemble averages; each costs a "
                                 "forward pass"),
}
#: The keys a config.json's model section must give: those that decide the network, its input
#: and the meaning of its outputs (the others have defaults older folders may lack).
REQUIRED_MODEL_KEYS = ("task", "size", "base_filters", "depth", "padding", "fit", "normalization",
                       "threshold", "class_names")
_CHOICES = {"task": TASKS, "preset": PRESETS, "encoder": ENCODERS, "padding": ("same", "valid"),
            "cls_head": ("global", "dense", "linear"), "fit": FITS, "cls_views": CLS_VIEWS, "normalization": ("divide255", "center", "lite")}
#: fractions: key -> (lowest, highest, lowest allowed?, highest allowed?)
_FRACTIONS = {"threshold": (0.0, 1.0, False, False), "dropout": (0.0, 1.0, True, False),
              "border": (0.0, 1.0, True, True)}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, input geometry and output conventions of one model.

    `size` is the side of the region whose pixels the model predicts (the "content" square the
    image is fitted into). Valid-convolution models lose `margin` pixels on each side, so their
    input is `size + 2 * margin`; same-padded models have margin 0.
    """

    task: str = "joint"
    preset: str = "compact"
    encoder: str = "unet"  # "unet" (the thesis's encoder, from scratch) or "efficientnet-lite0" (or -lite1, -lite2)
    pretrained: bool = False  # ImageNet weights loaded into the encoder before training
    size: int = 256
    base_filters: int = 16
    depth: int = 4
    padding: str = "same"  # "same" or "valid" (thesis)
    batch_norm: bool = True
    dropout: float = 0.1  # inside the U-Net encoder's conv blocks and bottleneck; each classifier
    # head (cls_head) has its own fixed dropout, part of that head's design (models.py)
    cls_head: str = "global"  # "global" (pooling) or "dense" (thesis: maxpool-flatten-1024)
    cls_pool_size: int = 2
    cls_dense_units: int = 1024
    fit: str = "squash"  # "pad" or "squash"
    border: float = 0.0  # extra border around the padded square, fraction of its side
    normalization: str = "divide255"
    # "none" or "shades-of-gray": the input's colour cast removed inside the model (dermtool.models)
    color_constancy: str = "none"
    # how pixels reach the network: "direct" or "jpeg256" (dermtool.preprocess.CHAINS)
    input_chain: str = "direct"
    # what the classifier looks at in infer: "frame" (the whole fitted image) or "frame+lesion"
    # (also the square around the model's own mask, the two probabilities averaged; dermtool.infer)
    cls_views: str = "frame"
    threshold: float = 0.5
    class_names: tuple = CLASS_NAMES
    # how many networks of this architecture the folder holds (`dermtool ensemble`): each sees the
    # same input, and the model's outputs are the mean of theirs (dermtool.models.build_models)
    members: int = 1
    # the members' shares of the mean, in member order (None: equal); `dermtool ensemble --weights`
    member_weights: tuple | None = None
    # The decision (dermtool.decision), fitted by `dermtool calibrate`; the defaults are the plain
    # softmax and argmax, so older model folders read and run as before.
    temperature: float = 1.0  # class probabilities = softmax(log(p) / temperature)
    melanoma_threshold: float | None = None  # label melanoma when p_melanoma >= this; None: argmax
    calibration: dict | None = None  # how the two above were fitted: target, sets, counts, scores

    def __post_init__(self):
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}.")
        if self.fit not in FITS:
            raise InputError(f"unknown fit mode {self.fit!r}; choose pad or squash.")
        if self.padding not in ("same", "valid"):
            raise InputError(f"unknown padding {self.padding!r}; choose same or valid.")
        if self.color_constancy not in COLOR_CONSTANCY:
            raise InputError(f"unknown colour constancy {self.color_constancy!r}; choose one of "
                             f"{', '.join(COLOR_CONSTANCY)}.")
        if self.input_chain not in INPUT_CHAINS:
            raise InputError(f"unknown input chain {self.input_chain!r}; choose one of {', '.join(INPUT_CHAINS)}.")
        check_cls_views(self.cls_views, self.task)
        if self.encoder not in ENCODERS:
            raise InputError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}.")
        if self.encoder != "unet" and (self.padding != "same" or self.size % 32 or self.depth != 5
                                       or self.normalization != "lite"):
            raise InputError(f"the {self.encoder} encoder needs same padding, depth 5 and its own normalisation "
                             f"(--preset lite0 sets them) and a --size that is a multiple of 32, not {self.size}.")
        if self.pretrained and self.encoder == "unet":
            raise InputError("--pretrained needs a pretrained encoder: add --encoder efficientnet-lite0 (or -lite1, -lite2).")
        if self.padding == "same" and self.size % (2**self.depth):
            raise InputError(f"--size {self.size} must be a multiple of 2**depth = {2 ** self.depth} (--depth "
                             f"{self.depth} halves the square that many times), e.g. "
                             f"{max(2 ** self.depth, self.size // 2 ** self.depth * 2 ** self.depth)}.")
        if not (isinstance(self.members, int) and not isinstance(self.members, bool)
                and 1 <= self.members <= ENSEMBLE_MAX):
            raise InputError(f"members must be a whole number from 1 to {ENSEMBLE_MAX}, not {self.members!r}.")
        if self.member_weights is not None:
            w = self.member_weights
            if not (isinstance(w, (list, tuple)) and len(w) == self.members and self.members > 1
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
                            for v in w)):
                raise InputError(f"member_weights must be {self.members} positive numbers, one per member of an "
                                 f"ensemble, not {str(w)[:60]}.")
            total = sum(float(v) for v in w)  # as models._Mean adds them
            if not 0 < total < float("inf"):  # each finite, their sum not: every share w / sum would be 0
                raise InputError(f"member_weights must add up to a finite number (each member's share is its "
                                 f"weight over the sum), not {str(w)[:60]}; scale them down, e.g. to 1, 2.")
            object.__setattr__(self, "member_weights", tuple(float(v) for v in w))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        self._check_decision()

    def _check_decision(self) -> None:
        from dermtool.decision import check_temperature, check_threshold

        object.__setattr__(self, "temperature", check_temperature(self.temperature, "model.temperature"))
        if self.melanoma_threshold is not None:
            if not self.has_cls or "melanoma" not in self.class_names:
                raise InputError("a melanoma_threshold needs a model with a classifier that has a melanoma class.")
            object.__setattr__(self, "melanoma_threshold",
                               check_threshold(self.melanoma_threshold, "model.melanoma_threshold"))

    @property
    def has_seg(self) -> bool:
        return self.task in ("seg", "joint")

    @property
    def has_cls(self) -> bool:
        return self.task in ("cls", "joint")

    @property
    def margin(self) -> int:
        """Pixels lost on each side by valid convolutions (0 for same padding)."""
        if self.padding == "same":
            return 0
        return valid_unet_margin(self.size, self.depth)

    @property
    def input_size(self) -> int:
        return self.size + 2 * self.margin


def valid_unet_margin(output_size: int, depth: int) -> int:
    """Margin of a valid-convolution U-Net whose output is `output_size` (thesis: 388 -> 92)."""
    s = output_size
    for _ in range(depth):  # decoder, walked backwards: two 3x3 convs then a 2x up-convolution
        s += 4
        if s % 2:
            raise InputError(f"size {output_size} does not fit a valid U-Net of depth {depth}.")
        s //= 2
    s += 4  # bottleneck convs
    for _ in range(depth):  # encoder, backwards: pool then two convs
        s = s * 2 + 4
    return (s - output_size) // 2


def check_cls_views(views, task: str) -> str:
    """`views` if the classifier of a `task` model can look that way; InputError otherwise."""
    if views not in CLS_VIEWS:
        raise InputError(f"unknown classifier views {views!r}; choose frame or frame+lesion.")
    if views == "frame+lesion" and task != "joint":
        raise InputError(f"the lesion view (frame+lesion) needs a joint model, whose mask says where the lesion "
                         f"is, not a {task} model.")
    return views


def preset_config(preset: str, task: str, **overrides) -> ModelConfig:
    """The named architecture preset with optional overrides (None values are ignored)."""
    if preset == "thesis":
        base = dict(
            preset="thesis", size=388, base_filters=32, depth=4, padding="valid",
            batch_norm=False, dropout=0.2, cls_head="dense", fit="pad", border=0.0,
        )
    elif preset == "compact":
        base = dict(
            preset="compact", size=256, base_filters=16, depth=4, padding="same",
            batch_norm=True, dropout=0.1, cls_head="global", fit="squash",
        )
    elif preset == "lite0":
        # ImageNet EfficientNet-Lite0 encoder (5 downsamplings) under a light U-Net decoder
        base = dict(
            preset="lite0", encoder="efficientnet-lite0", pretrained=True, size=192, base_filters=12,
            depth=5, padding="same", batch_norm=True, dropout=0.0, cls_head="linear", fit="squash",
            normalization="lite",
        )
    else:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(task=task, **base)


#: the largest --consistency weight: a bound on typos, far above the weights tried (3 and 10)
CONSISTENCY_MAX = 100.0


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained; saved in the run folder's `config.json`."""

    epochs: int = 50
    batch_size: int = 16
    learning_rate: float = 1e-3
    lr_factor: float = 0.8
    lr_patience: int = 5
    alpha: float = 0.5
    seg_loss: str = "bce"  # "bce" or "bce+dice"
    class_weights: tuple = ()
    augment: str = "flips+color"  # "none" or groups joined by "+" (dermtool.augment.GROUPS)
    sampler: str = "proportional"  # "proportional" or "balanced" (dermtool.dataset)
    steps_per_epoch: int = 0  # 0: one pass over the training images
    schedule: str = "plateau"  # "plateau" (x lr_factor after lr_patience epochs) or "cosine"
    seed: int = 0
    mixed_precision: bool = False
    strategy: str = "default"
    freeze: str = "none"  # FREEZES: stem is the encoder's full-resolution stage, early also its 1/2 and 1/4 stages
    seg_batch: int = 0  # joint: the decoder trains on the first N images of each batch (0: all)
    progressive: int = 0  # progressive resizing: the first epochs train at this side, then +32 ... (0: off)
    ema: float = 0.0  # momentum of an exponential moving average of the weights (0: off)
    keep_epochs: bool = False  # every epoch's weights also kept as a model folder, RUN/epochs/epoch-NNN
    consistency: float = 0.0  # weight of the loss tying two resampling chains of one image together (0: off)
    # distillation (dermtool.distill): the teacher predictions CSVs (absolute paths), a SHA-256 of
    # their bytes (--resume refuses changed teachers) and the teacher's share of the targets
    teacher: tuple = ()
    teacher_sha256: str = ""
    distill: float = 0.0
    init_from: str = ""
    command: str = ""
    # absolute paths of the caches, so --resume can refuse others (dermtool.train.resume_caches)
    train_caches: tuple = ()
    val_caches: tuple = ()
    # the caches' fingerprints (cache.json) when the run started, in the order above, so --resume
    # refuses a cache rebuilt from other data at the same path
    cache_fingerprints: tuple = ()

    @property
    def dice(self) -> bool:
        """--dice: the mask loss adds the Dice term (seg_loss "bce+dice")."""
        return self.seg_loss == "bce+dice"

    def __post_init__(self):
        """The settings a resumed run reads back from its config.json, checked like train's options."""
        def count(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        if self.freeze not in FREEZES:
            raise InputError(f"train.freeze must be one of {', '.join(FREEZES)}, not {self.freeze!r}")
        for key in ("seg_batch", "progressive"):
            if not count(getattr(self, key)):
                raise InputError(f"train.{key} must be a whole number, 0 or more, not {getattr(self, key)!r}")
        if not (isinstance(self.ema, (int, float)) and not isinstance(self.ema, bool)
                and (self.ema == 0 or 0.5 <= self.ema < 1)):
            raise InputError(f"train.ema must be 0 (off) or a momentum from 0.5 to below 1, not {self.ema!r}")
        if not isinstance(self.keep_epochs, bool):
            raise InputError(f"train.keep_epochs must be true or false, not {self.keep_epochs!r}")
        if not (isinstance(self.consistency, (int, float)) and not isinstance(self.consistency, bool)
                and 0 <= self.consistency <= CONSISTENCY_MAX):
            raise InputError(f"train.consistency must be a weight from 0 (off) to {CONSISTENCY_MAX:g}, "
                             f"not {self.consistency!r}")
        for group in ("pair-flips", "pair-anchor"):  # dermtool.augment.PAIR_GROUPS, without importing Pillow here
            if group in str(self.augment).split("+") and not self.consistency:
                raise InputError(f"train.augment: {group} changes the consistency pairs, so it needs "
                                 "--consistency (a weight above 0)")
        if not (isinstance(self.distill, (int, float)) and not isinstance(self.distill, bool)
                and 0 <= self.distill <= 1):
            raise InputError(f"train.distill must be the teacher's share of the targets, from 0 (off) to 1, "
                             f"not {self.distill!r}")
        if bool(self.distill) != bool(self.teacher):
            raise InputError("train.distill and train.teacher go together: a teacher's predictions need a "
                             "share of the targets above 0, and a share needs a teacher")
        if self.consistency and (not isinstance(self.batch_size, int) or self.batch_size % 2):
            raise InputError(f"train.consistency needs an even batch size (each image comes twice), "
                             f"not {self.batch_size!r}")


def save_config(path: Path, model: ModelConfig, train: TrainConfig | None = None, **extra) -> None:
    payload = {"model": dataclasses.asdict(model)}
    if train is not None:
        payload["train"] = dataclasses.asdict(train)
    payload.update(extra)
    from dermtool.io import claim

    tmp = claim(Path(path).with_suffix(".json.tmp"))
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def load_config(path: Path) -> tuple[ModelConfig, TrainConfig | None, dict]:
    """Read `config.json`; returns (model config, train config or None, the raw dict).

    The file is input like any other (a model folder or export may come from anyone): its model
    section is checked by `check_model_section` before anything is built from it.

    Raises:
        InputError: one sentence naming the file and the key that is missing, of the wrong type
            or out of range.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise InputError(f"{path}: no config.json here; is this a model folder written by dermtool train?")
    from dermtool.io import read_json

    raw = read_json(path, "dermtool config", kind=object)  # size-limited, and deep nesting is refused
    try:
        if not isinstance(raw, dict):
            raise InputError("the file is not a JSON object")
        check_model_section(raw.get("model"))
        for section in ("train", "export"):
            if section in raw and not isinstance(raw[section], dict):
                raise InputError(f"{section} must be a JSON object")
        model = ModelConfig(**raw["model"])
        if model.padding == "valid":  # a size that no valid U-Net of this depth predicts
            valid_unet_margin(model.size, model.depth)
        train = TrainConfig(**raw["train"]) if "train" in raw else None
    except InputError as exc:
        raise InputError(f"{path}: {str(exc).rstrip('.')}.")
    except TypeError as exc:  # a key TrainConfig does not know
        raise InputError(f"{path}: not a valid dermtool config ({exc}).")
    return model, train, raw


def check_model_section(model) -> None:
    """Check a config.json's model section: required keys, no unknown key, types, ranges.

    The same ranges as `train`'s options (MODEL_RANGES), so a file can describe only a model
    train could have written. `class_names` must be CLASS_NAMES in that order: it is the order of
    the network's outputs, of the CSV columns and of the label; a file that reorders it would
    relabel every prediction.

    Raises:
        InputError: naming the key, as "model.<key> ..." (the caller adds the file).
    """
    if not isinstance(model, dict):
        raise InputError("model must be a JSON object with the model's settings")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in model:
        if key not in known:
            raise InputError(f"model.{key} is not a setting dermtool knows")
    for key in REQUIRED_MODEL_KEYS:
        if key not in model:
            raise InputError(f"model.{key} is missing")
    for key, value in model.items():
        problem = _model_value_problem(key, value)
        if problem:
            raise InputError(f"model.{key} {problem}, not {json.dumps(value)[:60]}")


def _model_value_problem(key: str, value) -> str:
    """What is wrong with one model setting ("" when nothing)."""
    if key in MODEL_RANGES:
        low, high, why = MODEL_RANGES[key]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return "" if ok else f"must be an integer from {low} to {high} ({why})"
    if key in _FRACTIONS:
        low, high, with_low, with_high = _FRACTIONS[key]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and (low < value or (with_low and value == low)) and (value < high or (with_high and value == high)))
        interval = f"{'[' if with_low else '('}{low:g}, {high:g}{']' if with_high else ')'}"
        return "" if ok else f"must be a number in {interval}"
    if key in _CHOICES:
        return "" if value in _CHOICES[key] else f"must be one of {', '.join(_CHOICES[key])}"
    if key in ("pretrained", "batch_norm"):
        return "" if isinstance(value, bool) else "must be true or false"
    if key == "calibration":  # read as an object by infer and the report (its target_sensitivity)
        if value is None:
            return ""
        if not isinstance(value, dict):
            return "must be null or a JSON object (how dermtool calibrate fitted the decision)"
        target = value.get("target_sensitivity")
        ok = target is None or (isinstance(target, (int, float)) and not isinstance(target, bool) and 0 < target <= 1)
        return "" if ok else "must hold a target_sensitivity in (0, 1] or none"
    if key == "class_names":
        ok = isinstance(value, list) and tuple(value) == CLASS_NAMES
        return "" if ok else (f"must be {', '.join(CLASS_NAMES)} in this order (the order of the model's "
                              "outputs and of every CSV column)")
    return ""

