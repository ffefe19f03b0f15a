"""What the user's paths must be, checked before anything slow (no torch here): inputs that exist,
outputs that can be written. Every message is one sentence that names the user's path.

    check_model_path("model.gguf")                 # a file, or a Hugging Face directory
    check_input_file("book.txt", "data file")
    check_output_dir("runs/a", "run directory")    # a directory that exists or can be made
    check_output_file("merged.gguf", "output file")
    io_message(err)                                # an OSError as one sentence
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


class PathError(ValueError):
    """A path that cannot be used as given; the message says which and why."""


def missing_model(path) -> FileNotFoundError:
    """The one error for a model path that is not there (every command says it the same way)."""
    return FileNotFoundError(f"model file not found: {path} (a .gguf file or a Hugging Face safetensors "
                             "directory is expected)")


def check_model_path(path) -> None:
    if not Path(path).exists():
        raise missing_model(path)


def check_input_file(path, what: str) -> None:
    """`path` is a readable file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if p.is_dir():
        raise PathError(f"{what} {path} is a directory; give a file")
    if not os.access(p, os.R_OK):
        raise PathError(f"{what} {path} is not readable (permission denied)")


def _writable_ancestor(p: Path, path, what: str) -> None:
    """The nearest existing ancestor of `p` is a directory we may create entries in."""
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PathError(f"cannot create the {what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PathError(f"cannot create the {what} {path}: {parent} is not writable; choose another place")


def check_output_dir(path, what: str = "output directory") -> None:
    """`path` is a writable directory, or can be created (nothing is created here)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise PathError(f"the {what} {path} is a file; give a directory (it is created if missing)")
        if not os.access(p, os.W_OK | os.X_OK):
            raise PathError(f"the {what} {path} is not writable; choose another one")
        return
    _writable_ancestor(p, path, what)


def check_output_file(path, what: str = "output file") -> None:
    """`path` is a file that can be written: not a directory, in a directory that exists and is
    writable."""
    p = Path(path)
    if p.is_dir():
        raise PathError(f"the {what} {path} is a directory; give a file name")
    if not p.parent.is_dir():
        raise PathError(f"cannot write the {what} {path}: the directory {p.parent} does not exist; "
                        "create it first")
    if not os.access(p.parent, os.W_OK | os.X_OK):  # files are written beside it, then renamed
        raise PathError(f"cannot write the {what} {path}: the directory {p.parent} is not writable; "
                        "choose another place")


class WriteError(OSError):
    """A file could not be written; the previous version of it (if any) is untouched. Its
    strerror is the whole sentence (io_message)."""


# errno -> (what happened, what to do)
_HINTS = {errno.ENOSPC: ("the disk is full", "free some space or choose another place"),
          errno.EDQUOT: ("the disk quota is exceeded", "free some space or choose another place"),
          errno.EACCES: ("permission denied", "fix the permissions or choose another place"),
          errno.EPERM: ("permission denied", "fix the permissions or choose another place"),
          errno.EROFS: ("the filesystem is read-only", "choose another place"),
          errno.ENOENT: ("it or a directory on the way does not exist", "check the path"),
          errno.ENOTDIR: ("a part of the path is a file, not a directory", "check the path"),
          errno.EISDIR: ("it is a directory", "give a file name")}


def io_message(err: OSError, path=None, doing: str = "write", kept: str = "") -> str:
    """One sentence for an OSError: what could not be done to which of the user's paths (`path`,
    else the error's own), why, what was kept, and what to do."""
    why, fix = _HINTS.get(err.errno) or ((err.strerror or str(err) or type(err).__name__).lower(), "check the path")
    target = path if path is not None else err.filename
    text = f"could not {doing} {target}" if target is not None else f"could not {doing} a file"
    return f"{text}: {why}" + (f" ({kept})" if kept else "") + f"; {fix}"


def write_error(err: OSError, path) -> WriteError:
    """The WriteError for `err` met while writing the user's `path` (through a temporary file)."""
    kept = "the previous version is intact" if os.path.exists(path) else "nothing was written"
    return WriteError(err.errno, io_message(err, path, "write", kept))


def failed_write(err: BaseException, path, temporaries=()) -> BaseException:
    """What to raise when writing the user's `path` through `temporaries` failed with `err`: the
    temporaries are removed, and an OSError becomes the WriteError naming `path` (never a
    temporary file), caused by `err`; anything else is `err` itself."""
    for tmp in temporaries:
        try:
            os.remove(tmp)
        except OSError:
            pass
    if isinstance(err, OSError) and not isinstance(err, WriteError):
        out = write_error(err, path)
        out.__cause__ = err
        return out
    return err
