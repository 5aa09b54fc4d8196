"""Opening files we read: regular files only, never a FIFO or a device (which would hang or never end).

Every file moe-convert reads (config.json, the index, shards, job files, and in an output directory the
manifest, the journal, config.json and the rank files) is opened here: non-blocking (opening a FIFO then
returns at once instead of waiting for a writer), checked with fstat to be a regular file, then read.
In an output directory links are never followed (`follow_symlinks=False`): the directory is ours only
through what we created.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import MoeConvertError


def kind_of(mode: int) -> str:
    """What a file is, for messages: `a FIFO`, `a directory`, ..."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular(
    path: Path, error: type[MoeConvertError], *, follow_symlinks: bool = True, hint: str = ""
) -> Iterator[tuple[int, os.stat_result]]:
    """A read-only descriptor of `path` and its fstat, once it is known to be a regular file.

    Raises `error` naming the path for anything else (missing, a FIFO, a device, a directory, and a
    symlink when `follow_symlinks` is False) and for any OS error; the descriptor is closed on exit.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise open_error(path, e, error, follow_symlinks=follow_symlinks, hint=hint) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: is {kind_of(st.st_mode)}, not a regular file; refusing to read it{hint}")
        yield fd, st
    finally:
        os.close(fd)


def open_error(
    path: Path, e: OSError, error: type[MoeConvertError], *, follow_symlinks: bool = True, hint: str = ""
) -> MoeConvertError:
    if e.errno == errno.ENOENT:
        return error(f"{path}: not found{hint}")
    if not follow_symlinks and e.errno == errno.ELOOP:
        return error(f"{path}: is a symlink; links in an output directory are never followed{hint}")
    return error(f"{path}: cannot read: {e.strerror or e}{hint}")


def read_regular(
    path: Path, error: type[MoeConvertError], *, limit: int, follow_symlinks: bool = True, hint: str = ""
) -> bytes:
    """The whole content of a small regular file, refused (before reading) when over `limit` bytes."""
    with open_regular(path, error, follow_symlinks=follow_symlinks, hint=hint) as (fd, st):
        if st.st_size > limit:
            raise error(f"{path}: {st.st_size} bytes, over the {limit} byte limit for this file{hint}")
        return read_exactly(fd, path, st.st_size, error)


def read_exactly(fd: int, path: Path, n: int, error: type[MoeConvertError], *, offset: int = 0) -> bytes:
    """Exactly n bytes at `offset`, never more (the file may have grown since it was sized)."""
    chunks, got = [], 0
    try:
        while got < n:
            chunk = os.pread(fd, min(n - got, 1 << 24), offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from e
    if got != n:
        raise error(f"{path}: read {got} of {n} bytes; the file changed while reading")
    return b"".join(chunks)
