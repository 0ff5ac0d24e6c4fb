"""The one atomic-write helper: write under a temporary name beside the target, rename at commit."""

from __future__ import annotations

import collections
import errno
import glob
import itertools
import mmap
import os
from pathlib import Path
from typing import Callable

from .errors import OutputError
from .tensor_ref import Ranges, map_pages

TMP_SUFFIX = ".partial"
WRITE_PIECE = 4 << 20  # bytes per write() from memory: a cast's whole chunk (benchmarks/README.md)
MAP_WINDOW = 16 << 20  # bytes of a source file mapped at a time by a mapped write
MAP_WRITE_PIECE = 1 << 20  # bytes per write() from a mapping (benchmarks/README.md: 256 KiB is slower there)
IOV_MAX = 1024  # pieces per writev() (Linux's limit)


def temp_name(final: Path) -> Path:
    """Hidden temporary name in the target folder; never a name a loader would pick up."""
    return final.with_name(f".{final.name}.{os.getpid()}{TMP_SUFFIX}")


def make_folder(folder: Path) -> None:
    """Create an output folder and its parents; a failure is one OutputError naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {folder}: {e.strerror}") from None


def remove_stale_temps(final: Path) -> None:
    """Temporary files a killed run left for the same target (their process is gone) are removed."""
    for path in final.parent.glob(f".{glob.escape(final.name)}.*{TMP_SUFFIX}"):
        pid = path.name[len(final.name) + 2:-len(TMP_SUFFIX)]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def room_for_files(count: int) -> None:
    """Room for `count` output files open at once (a 1024-rank distributed checkpoint writes 1024 files side by
    side): the soft limit on open files is raised toward the hard one when short, as it may be unprivileged; a
    clear error when the hard limit itself is short."""
    try:
        import resource
    except ImportError:  # not POSIX: nothing to raise
        return
    need = count + _open_files() + SOURCE_FILES + 32  # the outputs, what is open now, the sources, a margin
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise OutputError(f"writing {count} files at once needs about {need} open files, but the limit is {hard} "
                          "(raise it with `ulimit -n`)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: a guess
        return 64


SOURCE_FILES = 64  # source files kept open at once, by all the outputs of the process together


class _Sources:
    """Read-only fds of the source files the outputs copy from, shared by every output file of the process,
    the least recently used closed past SOURCE_FILES (each rank file of a distributed checkpoint reads every
    source shard, and hundreds are written side by side); all closed when the last output file closes."""

    def __init__(self):
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.users = 0  # output files open

    def fd(self, path: str) -> int:
        fd = self._fds.pop(path, None)
        if fd is None:
            if len(self._fds) >= SOURCE_FILES:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        return fd

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


_SOURCES = _Sources()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mapped_write(src: int, dst: int, offset: int, length: int) -> int:
    """write() straight from a read-only mapping of the source's page cache: the kernel copies each byte
    once, whatever the two offsets are (a copy_file_range between different page offsets costs ≈ 1.3 ×)."""
    end = min(offset + length, offset - offset % mmap.ALLOCATIONGRANULARITY + MAP_WINDOW, os.fstat(src).st_size)
    if end <= offset:
        return 0  # at the end of the file
    start, window = map_pages(src, offset, end)
    with window:
        view = memoryview(window)
        done = offset - start
        try:
            while done < len(view):
                done += os.write(dst, view[done:done + MAP_WRITE_PIECE])
        finally:
            view.release()
    return done - (offset - start)


def mapped_views(ranges: Ranges):
    """The pieces' bytes in order, as (memoryviews, their bytes): views of populated, read-only mappings of
    the files, the pieces of one region (a TP column slice: a piece per row) sharing a mapping of at most
    MAP_WINDOW per file; at most IOV_MAX views and MAP_WRITE_PIECE bytes at a time (a large piece comes in
    parts). A view keeps its mapping alive; nothing is copied."""
    todo, files = [piece for piece in ranges if piece[2]], {}
    windows: dict[str, tuple[int, memoryview]] = {}  # path → (file offset of its window, the window)
    unmapped, count = (0, memoryview(b"")), len(todo)
    try:
        index = 0
        while index < count:
            path, offset, length = todo[index]
            start, window = windows.get(path, unmapped)
            if not start <= offset < start + len(window):
                start, window = windows[path] = _map(files, path, offset, _region_end(todo, index))
            views, total, last = [], 0, min(count, index + IOV_MAX)
            while index < last:  # the run of pieces inside the files' windows
                other, at, size = todo[index]
                first, view = windows.get(other, unmapped)
                if at < first or at + size > first + len(view) or total + size > MAP_WRITE_PIECE:
                    break
                views.append(view[at - first:at - first + size])
                total += size
                index += 1
            if not views:  # a large piece, or one past its window: its first part
                total = min(length, start + len(window) - offset, MAP_WRITE_PIECE)
                views.append(window[offset - start:offset - start + total])
                todo[index] = path, offset + total, length - total
            yield views, total
    finally:
        for fd, _ in files.values():
            os.close(fd)


def _map(files: dict[str, tuple[int, int]], path: str, offset: int, end: int) -> tuple[int, memoryview]:
    """(start, view) of a populated read-only mapping of `path` from `offset` (rounded down) to `end`."""
    if path not in files:
        fd = os.open(path, os.O_RDONLY)
        files[path] = fd, os.fstat(fd).st_size
    fd, size = files[path]
    end = min(end, size)
    if end <= offset:
        raise OutputError(f"{path}: unexpected end of file at byte {offset}")
    start, window = map_pages(fd, offset, end)
    return start, memoryview(window)


def _region_end(ranges: list, index: int) -> int:
    """Where a mapping for piece `index` ends: past it and the next pieces of its file as long as they start
    inside MAP_WINDOW (pieces of other files between are passed over)."""
    path, offset, length = ranges[index]
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    limit = start + MAP_WINDOW
    end = offset + length
    for other, at, size in itertools.islice(ranges, index + 1, None):
        if other == path:
            if not start <= at < limit:
                break
            if at + size > end:
                end = at + size
    return min(end, limit)


def _copy_file_range(src: int, dst: int, offset: int, length: int) -> int:
    return os.copy_file_range(src, dst, length, offset)


def _sendfile(src: int, dst: int, offset: int, length: int) -> int:
    return os.sendfile(dst, src, offset, length)


# Ways to move file bytes without them passing through this process, best first; read/write after them.
KERNEL_COPIES = (_mapped_write,) + tuple(copy for copy, name in ((_copy_file_range, "copy_file_range"),
                                                                 (_sendfile, "sendfile")) if hasattr(os, name))
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSOCK, errno.ENODEV}


class OutputFile:
    """Streams bytes into a temporary file; `commit()` renames it over `final`, `abort()` removes it."""

    def __init__(self, final: Path, on_bytes: Callable[[int], None] | None = None):
        self.final = Path(final)
        self.tmp = temp_name(self.final)
        remove_stale_temps(self.final)
        self._on_bytes = on_bytes or (lambda n: None)
        self._copies = KERNEL_COPIES
        self.position = 0
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write {self.final}: {e.strerror}") from None
        _SOURCES.users += 1

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._write_all(view)
        self._advance(len(view))

    def _write_all(self, view: memoryview) -> None:
        while view:  # WRITE_PIECE at a time: a huge buffer is written in bounded steps
            view = view[self._io(os.write, self.fd, view[:WRITE_PIECE]):]

    def copy_from(self, path: str, offset: int, length: int) -> None:
        """Copy bytes of another file in the kernel (copy_file_range, then sendfile, then read/write)."""
        src = _SOURCES.fd(path)
        while length > 0:
            n = self._copy(src, offset, length)
            if n == 0:
                raise OutputError(f"{path}: unexpected end of file at byte {offset}")
            offset += n
            length -= n
            self._advance(n)

    def copy_ranges(self, ranges: Ranges) -> None:
        """Copy (path, offset, length) pieces of other files in turn: many at once, each write a writev of
        views of the sources' mappings (a TP column slice is a piece per row); one through copy_from."""
        if len(ranges) == 1 or self._copies[:1] != (_mapped_write,):
            for path, offset, length in ranges:
                self.copy_from(path, offset, length)
            return
        batch, size = [], 0
        for views, nbytes in mapped_views(ranges):
            if len(batch) + len(views) > IOV_MAX or size + nbytes > MAP_WRITE_PIECE:
                self._write_views(batch, size)
                batch, size = [], 0
            batch += views
            size += nbytes
        self._write_views(batch, size)

    def _write_views(self, views: list[memoryview], size: int) -> None:
        left = size
        while left:
            n = self._io(os.writev, self.fd, views)
            left -= n
            if left:  # writev wrote less than asked: go on from there
                while n >= len(views[0]):
                    n -= len(views[0])
                    views = views[1:]
                views[0] = views[0][n:]
        self._advance(size)

    def _copy(self, src: int, offset: int, length: int) -> int:
        """One copy call of the first way the file systems take; a refused way is not tried again."""
        while self._copies:
            try:
                return self._copies[0](src, self.fd, offset, length)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    self._raise(e)
                self._copies = self._copies[1:]
        return self._slow_copy(src, offset, length)

    def _slow_copy(self, src: int, offset: int, length: int) -> int:
        chunk = os.pread(src, min(length, WRITE_PIECE), offset)
        self._write_all(memoryview(chunk))
        return len(chunk)

    def _advance(self, n: int) -> None:
        self.position += n
        self._on_bytes(n)

    def _io(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            self._raise(e)

    def _raise(self, e: OSError):
        reason = "disk full" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else \
            "a source file shrank while it was being read" if e.errno == errno.EFAULT else e.strerror  # mapped write
        raise OutputError(f"cannot write {self.final}: {reason}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _SOURCES.release()

    def commit(self) -> None:
        """Close and rename into place (atomic against interruption of this process)."""
        self.close()
        try:
            os.replace(self.tmp, self.final)
        except OSError as e:
            self._raise(e)

    def abort(self) -> None:
        self.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
