"""Import TensorFlow without its start-up chatter.

TensorFlow 2.2x writes oneDNN / CUDA-probe lines to file descriptor 2 from C++ before its
logging is configured, so TF_CPP_MIN_LOG_LEVEL does not stop them. A user wants the command's
own messages, so fd 2 is pointed at /dev/null for the import and the first device probe only
(and, through `quiet`, for the model converters, which print pages of C++ logs).
Set DERMTOOL_TF_LOGS=1 to see them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

if not os.environ.get("DERMTOOL_TF_LOGS"):
    # TensorFlow's Python warnings (a predict function traced again for a new batch shape, say)
    # are about its internals, not the user's command; errors still show
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet():
    """Silence file descriptor 2 (C++ logging included) inside the block, unless DERMTOOL_TF_LOGS."""
    if os.environ.get("DERMTOOL_TF_LOGS"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def backend() -> str:
    """Keras's backend: KERAS_BACKEND, else tensorflow.

    TensorFlow is dermtool's backend everywhere it is installed. `KERAS_BACKEND=jax` lets
    `dermtool train` run where TensorFlow is not, such as a GPU machine that ships JAX: the
    network, losses and weights files are plain Keras 3, and a model trained there loads under
    TensorFlow with the same outputs. Export, --strategy mirrored and TensorBoard logs need
    TensorFlow. (The torch backend has not been tried.)
    """
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def gpu_count() -> int:
    """GPUs the Keras backend sees."""
    name = backend()
    if name == "tensorflow":
        return len(load().config.list_physical_devices("GPU"))
    if name == "jax":
        import jax

        return sum(d.platform in ("gpu", "cuda", "rocm") for d in jax.devices())
    if name == "torch":
        import torch

        return torch.cuda.device_count()
    return 0


def load():
    """Import tensorflow (quietly, once) and return the module; None under another Keras backend."""
    if backend() != "tensorflow":
        return None
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    with quiet():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    return tf
