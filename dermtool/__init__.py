"""dermtool: segment and classify dermoscopy images of skin lesions."""

import os as _os

# TensorFlow prints pages of C++ start-up chatter otherwise; users can still override it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

#: Class order used everywhere: model outputs, CSV columns, confusion matrices.
CLASS_NAMES = ("melanoma", "seborrheic_keratosis", "nevus")
