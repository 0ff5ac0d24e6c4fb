"""The benchmarks' measuring harness: one child process per step, timed and accounted by the kernel.

Imports nothing heavy: on Linux a child's ru_maxrss starts from the RSS its parent had at fork, so the
measuring process stays small (its own peak is printed as every child's floor).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
READ_PIECE = MIB  # small and reused: this process's RSS is every child's ru_maxrss floor


@dataclass(frozen=True)
class Run:
    """One child's figures: wall and CPU seconds, peak RSS and bytes read (rchar: every read(),
    pread(), copy_file_range() source byte; read_bytes: what came from storage, mmap faults included)."""
    wall: float
    cpu: float
    rss: int
    rchar: int
    read_bytes: int


def run_child(argv: list[str], log: Path, cwd: Path | None = None) -> Run:
    """Run one child, stdout and stderr to `log`; exits with the log's tail on a non-zero status.

    The child is waited for without being reaped (waitid WNOWAIT), so its /proc/<pid>/io is read after
    it has done everything and before it disappears; os.wait4 then gives its CPU time and peak RSS."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - start
        io = _proc_io(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"error: {' '.join(argv)} exited {code}:\n{log.read_text(errors='replace')[-2000:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,  # ru_maxrss is KiB on Linux
               io.get("rchar", 0), io.get("read_bytes", 0))


def _proc_io(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:  # no task I/O accounting in this kernel
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())


def warm(path: Path) -> float:
    """Read every file once so the steps start from the same (warm) page cache; returns the seconds."""
    start = time.perf_counter()
    buf = bytearray(READ_PIECE)
    for file in files(path):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def evict(path: Path) -> None:
    """Drop these files' clean pages from the page cache (theirs only), so the next reader reads storage."""
    os.sync()
    for file in files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def own_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in files(path)) if path.exists() else 0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
