"""dermtool: segment and classify dermoscopy images of skin lesions.

From Python (the names in `__all__`; see the README's "From Python" section):

    import dermtool
    model = dermtool.load_model()              # the bundled model, or load_model("runs/joint")
    p = model.predict("lesion.jpg")            # -> Prediction: .mask .probabilities .label
    dermtool.predict_folder("images", "out")   # what `dermtool infer images --out out` does
    dermtool.score("out/predictions.csv", "truth.csv")  # what `dermtool score` prints, as a dict

`import dermtool` is cheap: TensorFlow is imported when a model is first loaded.
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING

# TensorFlow prints pages of C++ start-up chatter otherwise; users can still override it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

#: Class order used everywhere: model outputs, CSV columns, confusion matrices.
CLASS_NAMES = ("melanoma", "seborrheic_keratosis", "nevus")

# Imported now, not on first use like the other names: `dermtool.score` is also a module, and
# the first import of that module would otherwise replace this function by the module itself.
from dermtool.score import score  # noqa: E402  (after CLASS_NAMES, which dermtool.score reads)

__all__ = [
    "CLASS_NAMES",
    "InferOptions",
    "InferSummary",
    "InputError",
    "Model",
    "PostprocessConfig",
    "Prediction",
    "__version__",
    "load_model",
    "predict_folder",
    "score",
]

if TYPE_CHECKING:  # the names below are imported on first use (module __getattr__)
    from dermtool.api import Model, Prediction, load_model
    from dermtool.errors import InputError
    from dermtool.infer import InferOptions, InferSummary, predict_folder
    from dermtool.postprocess import PostprocessConfig

#: public name -> the module that defines it
_LAZY = {
    "load_model": "dermtool.api", "Model": "dermtool.api", "Prediction": "dermtool.api",
    "predict_folder": "dermtool.infer", "InferOptions": "dermtool.infer", "InferSummary": "dermtool.infer",
    "PostprocessConfig": "dermtool.postprocess", "InputError": "dermtool.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: the next access is a plain attribute
        return value
    raise AttributeError(f"module 'dermtool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
