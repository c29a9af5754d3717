"""A cgroup v2 ``memory.max`` per call, where this process may create cgroups with the memory controller.

The kernel then enforces the call's memory cap on every byte charged to it (anonymous and shared memory, tmpfs
pages, kernel memory of its files), on top of the polled watchdog. Used when the cgroup this process runs in
(the root cgroup, or one whose ``cgroup.subtree_control`` already enables ``memory``) or the directory named by
``APPO_SANDBOX_CGROUP`` (an operator-delegated cgroup with ``+memory`` in its ``cgroup.subtree_control``,
writable by this user, with this process inside the same delegated subtree) lets us make child cgroups.
Otherwise `find_parent` says why not, and the watchdog alone bounds a call.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

CGROUP_ENV = "APPO_SANDBOX_CGROUP"
_COUNTER = itertools.count()


@dataclass(frozen=True)
class CgroupParent:
    """Where per-call cgroups are made (`path`), or why there are none (`reason`)."""

    path: str | None
    reason: str = ""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _own_cgroup(proc: str) -> str | None:
    """This process's cgroup v2 directory: the ``0::`` line of /proc/self/cgroup under the cgroup2 mount."""
    rel = next((line[3:].strip() for line in _read(f"{proc}/cgroup").splitlines() if line.startswith("0::")), None)
    if rel is None:
        return None
    for line in _read(f"{proc}/mountinfo").splitlines():
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split()[0] == "cgroup2":
            return os.path.join(fields[0].split()[4], rel.lstrip("/")).rstrip("/") or "/"
    return None


def find_parent(proc: str = "/proc/self", environ: dict[str, str] | None = None) -> CgroupParent:
    """The cgroup v2 directory under which each call can get its own cgroup with ``memory.max``, or why none."""
    environ = os.environ if environ is None else environ
    path = environ.get(CGROUP_ENV) or _own_cgroup(proc)
    if not path:
        return CgroupParent(None, "no cgroup v2 hierarchy with this process in it")
    if not os.path.isfile(os.path.join(path, "cgroup.controllers")):
        return CgroupParent(None, f"{path} is not a cgroup v2 directory")
    if "memory" not in _read(os.path.join(path, "cgroup.subtree_control")).split():
        if "memory" in _read(os.path.join(path, "cgroup.controllers")).split():
            why = f"the memory controller is not enabled for the child cgroups of {path}"
        else:
            why = f"cgroup v2 at {path} has no memory controller (bound to cgroup v1, or not delegated)"
        return CgroupParent(None, f"{why}; {CGROUP_ENV} can name a delegated cgroup with +memory in its "
                                  "cgroup.subtree_control")
    if not os.access(path, os.W_OK):
        return CgroupParent(None, f"{path} is not writable by this user")
    return CgroupParent(path)


class CallCgroup:
    """One call's cgroup: made before the call, its processes moved in, removed after (`close`)."""

    def __init__(self, parent: str, memory_bytes: int):
        self.path = os.path.join(parent, f"appo-call-{os.getpid()}-{next(_COUNTER)}")
        os.mkdir(self.path)
        try:
            self._write("memory.max", str(memory_bytes))
            for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if os.path.exists(os.path.join(self.path, name)):
                    self._write(name, value)
        except OSError:
            self.close()
            raise

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def add(self, pids: list[int]) -> None:
        """Move `pids` in (one write each: the kernel takes one pid per write)."""
        for pid in pids:
            try:
                self._write("cgroup.procs", str(pid))
            except ProcessLookupError:
                pass

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the call for going over ``memory.max``."""
        for line in _read(os.path.join(self.path, "memory.events")).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip() not in ("", "0"):
                return True
        return False

    def close(self, wait_s: float = 2.0) -> None:
        """Kill what is left in the cgroup and remove it (the dying processes may take a moment to leave)."""
        if os.path.exists(os.path.join(self.path, "cgroup.kill")):
            try:
                self._write("cgroup.kill", "1")
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.002)
