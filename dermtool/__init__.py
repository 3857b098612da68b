"""dermtool: segment and classify dermoscopy images of skin lesions."""

__version__ = "0.1.0"

#: Class order used everywhere: model outputs, CSV columns, confusion matrices.
CLASS_NAMES = ("melanoma", "seborrheic_keratosis", "nevus")
