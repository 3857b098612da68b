"""One exception type for bad user input, turned into a one-line message by the CLI, and the
one sentence for an output that could not be written."""

from __future__ import annotations

import errno
import re


class InputError(Exception):
    """Bad input from the user: a file that is missing, unreadable or malformed.

    The message is one sentence that names the file (and row, where there is one) and the
    problem. The CLI prints it without a traceback and exits with code 2.
    """


#: a full disk in an error without errno: numpy's and tifffile's short write ("786432 requested
#: and 515004 written"), or h5py's and TensorFlow's messages that quote the system's
_DISK_FULL = re.compile(r"\d+ requested and \d+ written|No space left on device|Disk quota exceeded")


def disk_full(exc: BaseException) -> bool:
    """Whether a failed write ran out of space (or quota), including a short write without errno."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return bool(_DISK_FULL.search(str(exc)))


def write_failure(exc: OSError, what: str, path=None) -> str:
    """One sentence for an output that could not be written: which file, what it is, and why.

    Every command that writes words its failures with this (the CLI prints it, exit code 2),
    so a full disk always reads "the disk is full", never a byte count.

    Args:
        exc: the error of the write.
        what: the output, as in "cannot write {what}" (e.g. "the cache", "predictions.csv").
        path: the file or folder to name when the error names none.
    """
    where = getattr(exc, "filename", None) or path
    if disk_full(exc):
        reason = "the disk is full"
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
        if exc.errno == errno.ENOTDIR:
            reason += ": a file is where a folder should be"
        elif exc.errno == errno.EISDIR:
            reason += ": a folder is where the file should be"
    else:
        reason = str(exc) or type(exc).__name__
    return f"{where}: cannot write {what} ({reason})."


def unreadable(path, exc: BaseException, what: str = "not a readable image") -> str:
    """One sentence for a file a decoder or writer failed on with its own error (zlib's, a bad
    tag's), named with the error's type and first line, cut to 120 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{path}: {what} ({type(exc).__name__}: {text[:120]})."


def as_disk_full(exc: BaseException, path) -> BaseException:
    """h5py and TensorFlow word a write that ran out of space as a RuntimeError, without errno:
    that one becomes the OSError (ENOSPC, naming `path`) every command already words as one line;
    any other error is returned as it is."""
    import os

    if isinstance(exc, OSError) or not disk_full(exc):
        return exc
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
