"""What a load really read from disk: the page cache, file by file and tensor by tensor.

A weights file is memory-mapped and read on demand, so the bytes a load touched are the file's pages
that came into the page cache. ``evict`` drops a file's cached pages (``posix_fadvise``
DONTNEED: no root needed, clean pages only, so it fsyncs first); ``resident_bytes`` asks the kernel
which pages are cached (``mincore(2)``, which the standard library does not wrap: ctypes, as
util-linux's ``fincore`` does in C). ``worker.prefetch.tensor_ranges`` gives one tensor's bytes.

Linux only. tmpfs ignores DONTNEED: ``evict`` returns False where the pages stayed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def evict(path: Path) -> bool:
    """Drop ``path``'s pages from the page cache; whether none stayed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a file just written) cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_bytes(path) == 0


def drop_folder(folder: Path) -> bool:
    """Evict every safetensors file under ``folder`` (a cold disk for the next boot); whether all
    of them left the page cache."""
    return all([evict(path) for path in sorted(folder.rglob("*.safetensors"))])


def resident_bytes(path: Path, ranges: Iterable[tuple[int, int]] | None = None) -> int:
    """Bytes of ``path`` in the page cache, over the whole file or within ``ranges`` ([start, end)),
    counted in whole pages clipped to each range."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        # Not Python's mmap: mincore needs the mapping's address, which mmap.mmap does not give.
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
    resident = [bool(flag & 1) for flag in vector]
    total = 0
    for start, end in [(0, size)] if ranges is None else ranges:
        for page in range(start // _PAGE, (end + _PAGE - 1) // _PAGE):
            if resident[page]:
                total += min(end, (page + 1) * _PAGE) - max(start, page * _PAGE)
    return total


def read_ahead_kb(path: Path) -> int | None:
    """The kernel's read-ahead window for the disk ``path`` is on: around each page a load
    faults in, this much more is read, so it sets how much of an untouched tensor a load reads."""
    device = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for queue in (block / "queue", block / ".." / "queue"):  # a disk, or a partition of one
        if (queue / "read_ahead_kb").is_file():
            return int((queue / "read_ahead_kb").read_text())
    return None  # no block device (tmpfs, overlay on some kernels)
