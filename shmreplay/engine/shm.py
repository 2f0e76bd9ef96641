"""POSIX shared-memory segments: create, attach, view as numpy arrays, close, unlink.

Lifecycle, as in CPython's ``multiprocessing.shared_memory``: :meth:`Segment.close` releases this
process's mapping (numpy views must be dropped first); :meth:`Segment.unlink` destroys the name,
once, from any process (mappings stay valid until closed). A failed create unlinks what it made.

We never use ``multiprocessing.shared_memory`` to attach: before Python 3.13 its resource tracker
unlinks the daemon's segment when a client exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import shutil
import threading

import numpy as np
import posix_ipc

from ..errors import DaemonNotRunning, InsufficientSharedMemory, SegmentError
from .layout import Layout, decode_header, encode_header

SHM_DIR = "/dev/shm"
# Linux ≥ 5.14: fault every page of a range in now (one call instead of one fault per page).
MADV_POPULATE_WRITE = 23
PREFAULT_CHUNK = 64 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def shm_free_bytes() -> int:
    """Bytes still free in /dev/shm."""
    return shutil.disk_usage(SHM_DIR).free


def physical_memory() -> int | None:
    """This machine's memory in bytes (None if the system does not say): the bound of any
    buffer a call may allocate."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # unreachable


class Segment:
    """One mapped table segment and numpy views over its arrays."""

    name: str = ""
    layout: Layout | None = None
    _mmap: mmap.mmap | None = None

    def __init__(self, name: str, mm: mmap.mmap, layout: Layout) -> None:
        self.name = name
        self._mmap = mm
        self.layout = layout
        self._prefaulter: threading.Thread | None = None
        self._prefault_stop = threading.Event()
        self.arrays: dict[str, np.ndarray] = {}
        for a in layout.arrays:
            count = int(np.prod(a.shape, dtype=np.int64))
            view = np.frombuffer(mm, dtype=a.dtype, count=count, offset=a.offset)
            self.arrays[a.name] = view.reshape(a.shape)

    @classmethod
    def create(
        cls, name: str, layout: Layout, mode: int = 0o600, gid: int | None = None
    ) -> Segment:
        """Create, size and initialise a new segment (fails if the name exists).

        The bytes are reserved with ``posix_fallocate`` so a full /dev/shm fails here, at once,
        instead of with SIGBUS on first touch.
        """
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=0)
        try:
            os.fchmod(shm.fd, mode)  # the umask strips bits from mode= at creation
            if gid is not None:
                os.fchown(shm.fd, -1, gid)
            try:
                os.posix_fallocate(shm.fd, 0, layout.total_size)
            except OSError as exc:
                raise InsufficientSharedMemory(
                    f"table {layout.spec.name!r} needs {format_bytes(layout.total_size)} of "
                    f"shared memory but {SHM_DIR} has {format_bytes(shm_free_bytes())} free "
                    f"({exc.strerror}); lower max_size or enlarge {SHM_DIR}"
                ) from exc
            mm = mmap.mmap(shm.fd, layout.total_size)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise
        shm.close_fd()
        mm[: layout.header_size] = encode_header(layout).ljust(layout.header_size, b"\0")
        return cls(name, mm, layout)

    @classmethod
    def attach(cls, name: str, owner: int | None = None, daemon: bool = False) -> Segment:
        """Map an existing segment and verify its header.

        With ``owner``, the segment must be a regular file of that user (checked on the open
        descriptor; ``shm_open`` never follows a symlink), else PermissionDenied: a client
        passes the daemon's user, a daemon adopting a segment its own (``daemon=True``: the
        error then says what is in the way and what to do)."""
        from .ownership import access_denied, check_owner, is_out_of_descriptors, out_of_descriptors

        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise DaemonNotRunning(
                f"shared-memory segment {name} does not exist: the daemon is gone"
            ) from exc
        except posix_ipc.PermissionsError as exc:
            raise access_denied(f"{SHM_DIR}{name}", "a table segment") from exc
        except OSError as exc:
            if is_out_of_descriptors(exc):
                raise out_of_descriptors(f"opening table segment {SHM_DIR}{name}") from exc
            raise
        try:
            st = os.fstat(shm.fd)
            if owner is not None:
                check_owner(f"{SHM_DIR}{name}", st, owner, "a table segment", daemon)
            size = st.st_size
            if size == 0:
                raise SegmentError(f"{name}: empty segment (the daemon is still creating it)")
            try:
                mm = mmap.mmap(shm.fd, size)  # keeps a descriptor of its own (a dup)
            except OSError as exc:
                if is_out_of_descriptors(exc):
                    raise out_of_descriptors(f"mapping table segment {SHM_DIR}{name}") from exc
                raise
        finally:
            shm.close_fd()
        try:
            layout = decode_header(mm, size, name)
        except BaseException:
            mm.close()
            raise
        return cls(name, mm, layout)

    def prefault(self) -> None:
        """Map every page of the segment now, in a background thread.

        A page fault on a shared-memory page was measured at ~2.5 µs on a virtual machine
        (7 per Atari frame); faulting the whole segment in with MADV_POPULATE_WRITE costs about
        0.3 s per GiB, off the caller's path (ctypes releases the GIL). Kernels without it just
        fault lazily.
        """
        if self._mmap is None or self._prefaulter is not None:
            return
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        size = len(self._mmap)
        self._prefault_stop = threading.Event()
        stop = self._prefault_stop

        def run() -> None:
            for start in range(0, size, PREFAULT_CHUNK):
                if stop.is_set():
                    return
                length = min(PREFAULT_CHUNK, size - start)
                failed = _libc.madvise(base + start, length, MADV_POPULATE_WRITE) != 0
                if failed and ctypes.get_errno() != errno.EINTR:
                    return  # EINVAL: an older kernel; pages will be faulted in lazily

        self._prefaulter = threading.Thread(target=run, name="shmreplay-prefault", daemon=True)
        self._prefaulter.start()

    def close(self) -> None:
        """Release this process's mapping. Idempotent.

        If a caller still holds a numpy view of the mapping, the mapping is left for the garbage
        collector instead of being closed under the live view.
        """
        if self._prefaulter is not None:
            self._prefault_stop.set()
            self._prefaulter.join()  # it works on our mapping: let it finish its chunk
            self._prefaulter = None
        self.arrays = {}
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # someone still holds a view: the mapping dies with the last view

    @staticmethod
    def unlink(name: str) -> None:
        """Remove a segment's name; a missing segment is fine."""
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass
