"""Atomic file writing and hardened JSON/text reading shared by every reader and writer in the project.

A write goes to a temporary file in the destination's directory, is flushed to disk and then renamed over the
destination, so a crash or an exception mid-write leaves any previous file intact and no partial file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Callable, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OSError(f"cannot write {path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give it the mode an ordinary open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def parse_json_bytes(data: Union[bytes, str], path: PathLike, what: str = "JSON",
                     object_pairs_hook: Optional[Callable[..., Any]] = None) -> Any:
    """Parse JSON text read from ``path``; any decoding or parsing failure is a ValueError naming the file.

    Hostile input (invalid UTF-8, nesting deep enough to exhaust the recursion limit, integers past Python's
    digit limit) never escapes as UnicodeDecodeError, RecursionError or a bare ValueError.
    """
    path = os.fspath(path)
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: {what} is not UTF-8 text ({error})") from None
    except RecursionError:
        raise ValueError(f"{path}: {what} is not valid JSON (nested too deeply)") from None
    except ValueError as error:  # JSONDecodeError, int digit limit, or a ValueError from object_pairs_hook
        message = str(error)
        if path in message:
            raise ValueError(message) from None
        raise ValueError(f"{path}: {what} is not valid JSON ({message})") from None


def read_json_file(path: PathLike, what: str = "JSON",
                   object_pairs_hook: Optional[Callable[..., Any]] = None) -> Any:
    """Read and parse a JSON file; a malformed file is a ValueError naming it (OSError if it can't be read)."""
    with open(path, "rb") as handle:
        data = handle.read()
    return parse_json_bytes(data, path, what, object_pairs_hook)


def read_text_file(path: PathLike) -> str:
    """Read a UTF-8 text file; invalid UTF-8 is a ValueError naming the file."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{os.fspath(path)} is not UTF-8 text ({error})") from None
