"""The parent's side of a call: reading its output, polling the memory of its processes, killing them."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

INODE_BYTES = 1536
"""Kernel memory charged per file, directory, symlink or hard link in a call's private tmpfs (tmpfs counts each as
an inode): its inode and dentry. Measured on Linux 6.18: 1.0 KiB of slab per empty file with short names, 1.5 KiB
with 250-character names. The tmpfs size cap counts data pages only."""


@dataclass
class Outcome:
    """What `read_output` saw: the output kept, its total size, and why reading stopped (if not at EOF)."""

    kept: bytes
    total: int
    timed_out: bool = False
    flooded: bool = False
    memory_exceeded: bool = False


def read_output(proc: subprocess.Popen, deadline: float, output_limit: int, flood_kill_bytes: int,
                memory_limit: int | None, poll_s: float, tmpfs: tuple[tuple[str, int], ...] = ()) -> Outcome:
    """Read merged stdout/stderr in chunks until EOF, the deadline, a flood or too much memory.

    `memory_limit` None: no memory polling; otherwise the call is measured with `call_memory` every `poll_s`
    seconds (`tmpfs`: its private tmpfs, as (path inside the sandbox, size cap in bytes)).
    """
    kept = bytearray()
    total = 0
    fd = proc.stdout.fileno()
    watch = memory_limit is not None and poll_s > 0
    next_poll = time.monotonic() + poll_s
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return Outcome(bytes(kept), total, timed_out=True)
            if watch and now >= next_poll:
                next_poll = now + poll_s
                if call_memory(proc.pid, tmpfs) > memory_limit:
                    return Outcome(bytes(kept), total, memory_exceeded=True)
            ready = sel.select(timeout=min(remaining, poll_s) if watch else remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if len(kept) < output_limit:
                kept += chunk[: output_limit - len(kept)]
            if total > flood_kill_bytes:
                return Outcome(bytes(kept), total, flooded=True)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # closed its output but keeps running
        return Outcome(bytes(kept), total, timed_out=True)
    return Outcome(bytes(kept), total)


def children(pid: int) -> list[int]:
    """The direct children of `pid` (all its threads'), from /proc."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass
    return out


def tree_memory(pid: int) -> int:
    """Resident anonymous + shmem bytes summed over `pid` and all its descendants (via /proc)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status", "rb") as f:
                for line in f:
                    if line.startswith((b"RssAnon:", b"RssShmem:")):
                        total += int(line.split()[1]) << 10
        except (OSError, ValueError):
            continue
        stack.extend(children(p))
    return total


def tmpfs_memory(init_pid: int, tmpfs: tuple[tuple[str, int], ...]) -> int:
    """Bytes held in the private tmpfs of the sandbox whose init is `init_pid`: data pages plus `INODE_BYTES`
    per file (pages also mapped by a process count twice: the sum errs on the high side).

    Read through ``/proc/PID/root``, only once the init lives in its own root, and only from a filesystem of the
    size asked for (so never the host's /tmp while bubblewrap is still setting up)."""
    root = f"/proc/{init_pid}/root"
    try:
        if os.stat(root).st_dev == os.stat("/").st_dev:
            return 0
    except OSError:
        return 0
    total = 0
    for path, size in tmpfs:
        try:
            st = os.statvfs(root + path)
        except OSError:
            continue
        if st.f_frsize and st.f_blocks == -(-size // st.f_frsize):
            total += (st.f_blocks - st.f_bfree) * st.f_frsize + (st.f_files - st.f_ffree) * INODE_BYTES
    return total


def call_memory(bwrap_pid: int, tmpfs: tuple[tuple[str, int], ...] = ()) -> int:
    """The memory of a bubblewrap call: `tree_memory` of its processes plus `tmpfs_memory` of its tmpfs."""
    total = tree_memory(bwrap_pid)
    if tmpfs:
        for init in children(bwrap_pid)[:1]:
            total += tmpfs_memory(init, tmpfs)
    return total


def kill_tree(bwrap_pid: int) -> None:
    """Kill the init of the call's PID namespace (bwrap's child): the kernel then kills the whole namespace."""
    for pid in children(bwrap_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_group(pgid: int) -> None:
    """SIGKILL the process group `pgid` (the "none" level's call, started in a session of its own)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
