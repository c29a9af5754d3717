"""Sandboxed Python execution: the paper's `<python>` tool (`PythonTool`).

Each call runs the code in a fresh interpreter process, with stdout and stderr merged (in the order written,
as a terminal shows it), read incrementally and truncated. As the paper's tool does, a bare final
expression is printed (`repr`, unless it is None).

Isolation levels (`PythonTool(isolation=...)`; `PythonTool().isolation` reports the level achieved):

* ``"bubblewrap"`` (the default, chosen by ``"auto"``) — every call runs in its own [bubblewrap](
  https://github.com/containers/bubblewrap) sandbox (Debian/Ubuntu: ``apt-get install bubblewrap``; Fedora:
  ``dnf install bubblewrap``; no setuid bit needed, works for unprivileged users). Per call:
  - a private filesystem: only ``/usr`` (with the ``/bin``, ``/lib*`` links), ``/etc/ld.so.cache`` and the
    interpreter's prefix, venv and site-packages are visible, all read-only, at their host paths; a fresh
    size-capped tmpfs as working directory (``/sandbox``, also ``$HOME``), ``/tmp`` and ``/dev/shm``; a minimal,
    read-only ``/dev``; a ``/proc`` of its own PID namespace. No ``$HOME``, project, data directory, ``/run`` or
    ``/tmp`` of the host, hence no host unix sockets; a new network namespace (no network, no abstract
    sockets), IPC and UTS namespaces, a new session (no terminal injection), a cleared environment.
  - a fresh PID namespace whose init is the bootstrap; the user's code runs as its child, so when the code
    exits, or the call times out, or the trainer dies (``--die-with-parent``), the kernel kills every
    process of the call, including ones that cleared PDEATHSIG and called ``setsid()``.
  - an unprivileged user of its own user namespace: as root the sandbox drops to ``user``/``group``
    (default 65534 `nobody`) *after* bubblewrap has mounted the interpreter (so a venv under ``/root``
    works), then enters a new user namespace; as a normal user bubblewrap's user namespace maps the
    caller's uid. Either way no capabilities are left, ``PR_SET_NO_NEW_PRIVS`` is set, and since
    RLIMIT_NPROC is counted per (user namespace, uid) since Linux 5.14, the process cap is **per call**:
    a fork bomb in one call cannot starve concurrent calls.
  - limits: RLIMIT_CPU, RLIMIT_AS (per process), RLIMIT_NPROC (per call, see above), RLIMIT_FSIZE (SIGXFSZ
    ignored so writes fail with EFBIG), RLIMIT_NOFILE, no core dumps; each tmpfs is capped at
    ``tmpfs_mb``; and the memory of the whole call is polled every ``memory_poll_s`` by the parent, which
    kills the call above ``memory_mb``: resident anonymous + shmem memory summed over its processes, plus
    the bytes in its private tmpfs and ``sandbox.watchdog.INODE_BYTES`` (1.5 KiB) of kernel memory per file
    there (``sandbox.watchdog.call_memory``). Memory no process's RSS would show otherwise is refused: memfds
    and SysV IPC by the seccomp filter, writes to ``/dev`` by its read-only mount. This sum is a watchdog,
    not an allocator limit: between two polls a call can overshoot by what it allocates in that interval
    (each process is still bounded by RLIMIT_AS). Where this process may create memory-controlled cgroup v2
    cgroups (``sandbox.cgroup``: its own cgroup enables ``memory`` for children, or ``APPO_SANDBOX_CGROUP``
    names a delegated one), each call also gets its own cgroup with ``memory.max`` = ``memory_mb``, enforced
    by the kernel; `memory_enforcement` says which ("cgroup" or "watchdog"). CPU time is capped per
    process (RLIMIT_CPU) and per call by the wall-clock timeout, which kills the whole namespace.
  - the interpreter starts with ``-I -S``: its site-packages are on ``sys.path`` but their ``.pth`` files are
    not run (they cost ~30 ms per call; editable installs of project code would not be visible anyway).
  - ``isolate_network=False`` shares the host's network namespace (and so its abstract unix sockets).
  - a seccomp filter (x86_64; `sandbox.seccomp`): ptrace and process_vm_*, unshare/setns/mount and clone
    with namespace flags (no nested namespaces), keyrings, bpf, perf, userfaultfd, io_uring, module/kexec
    loading, file handles, clock setting, reboot, syslog, memfd_create/memfd_secret and SysV shared memory,
    semaphores and message queues fail with EPERM; clone3 with ENOSYS (libc falls back
    to clone). As root it is installed by the bootstrap after its own unshare, otherwise by bwrap.
  - not done: no Landlock ruleset on top. The code can signal the other processes *of its own call* (nothing
    else is visible).
  The trainer can log the achieved level once at start with `describe_isolation(tools)`.
* ``"none"`` (opt-in only, or ``APPO_PYTHON_ISOLATION=none``) — the weaker legacy sandbox: a bootstrap
  child with rlimits; as root a drop to ``user``, and new network and PID namespaces; not root, a network
  namespace where the kernel allows it, else a Python-level socket guard. The code sees the host
  filesystem with that user's permissions (a non-root user's secrets, home and project are exposed),
  RLIMIT_NPROC is shared by all calls of that user, and /tmp is the host's. For trusted code only.

Fail closed: with ``isolation="auto"`` (the default) and no working bubblewrap, the constructor raises
`SandboxUnavailable` naming the fix (install bubblewrap, or opt into ``isolation="none"``).

Persistent sessions (`persistent=True`): a "session" is one rollout. Instead of a long-lived worker (which
would have to be forked for branches and could leak state across rollouts), each call **replays** the
session's earlier successful cells with their output suppressed, then runs the new cell. The cells travel
to the sandbox over its stdin (no file a leftover process could rewrite). Costs: replay time counts
against the call's limits, and side effects of earlier cells (files, randomness) are re-run. Replayed cells
that raise are skipped.
"""

from __future__ import annotations

import logging
import marshal
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from .base import Tool, ToolOutput
from .sandbox import SANDBOX_ROOT, SandboxUnavailable, bootstrap_source, bwrap_command, sandbox_env
from .sandbox.bwrap import PRIVATE_TMPFS, interpreter_info, probe_cached
from .sandbox.cgroup import CallCgroup, CgroupParent, find_parent
from .sandbox.legacy import sandbox_interpreter
from .sandbox.seccomp import seccomp_pipe, seccomp_program, with_fd
from .sandbox.watchdog import children, kill_group, kill_tree, read_output

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("bubblewrap", "none")
"""Levels a `PythonTool` can run at, strongest first (``"auto"`` picks the first that works, or refuses)."""

__all__ = ["ISOLATION_LEVELS", "PythonTool", "SANDBOX_ROOT", "SandboxResult", "SandboxUnavailable",
           "describe_isolation"]

_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGXFSZ: "file size limit exceeded",
}


@dataclass
class SandboxResult:
    """The outcome of one sandboxed run. `text` is what the model sees."""

    text: str
    returncode: int | None
    timed_out: bool = False
    flooded: bool = False
    output_bytes: int = 0
    seconds: float = 0.0
    memory_exceeded: bool = False

    @property
    def failed(self) -> bool:
        return self.timed_out or self.flooded or self.memory_exceeded or self.returncode != 0


class PythonTool(Tool):
    """Runs model-written Python in a sandboxed subprocess (see the module docstring for the isolation).

    Args:
        name: tool name (the tag of the tag protocol: `<python>`).
        timeout: wall-clock seconds per call; the whole process tree is killed after it.
        cpu_time: CPU seconds per process (RLIMIT_CPU); defaults to `timeout`.
        memory_mb: address space per process (RLIMIT_AS) and resident memory summed over the call's
            processes (polled watchdog), in MiB.
        max_processes: RLIMIT_NPROC: processes and threads of one call (per call under bubblewrap).
        max_file_size_mb: RLIMIT_FSIZE in MiB.
        max_open_files: RLIMIT_NOFILE.
        max_output_chars: bytes of output kept (the rest is discarded while reading, and reported).
        flood_kill_bytes: a process that writes more than this is killed.
        user, group: uid/gid the sandbox runs as when the parent is root (None: no drop; "none" level only).
        isolate_network: no network (bubblewrap: a new network namespace; False shares the host's).
        persistent: replay the rollout's earlier successful cells before each call (module docstring).
        python_executable: interpreter for the child (default: this one, so the same packages exist).
        workdir_root: "none" level only: where throwaway directories are created (default: the temp dir).
        isolation: "auto" (bubblewrap, else refuse), "bubblewrap", or "none" (weak, opt-in); the
            environment variable APPO_PYTHON_ISOLATION sets the default.
        tmpfs_mb: size cap of each private tmpfs (working directory, /tmp, /dev/shm) in MiB.
        memory_poll_s: how often the summed memory of a call is checked.
        bwrap: path of the bubblewrap binary (default: `bwrap` on PATH).
        seccomp: add the seccomp filter of `sandbox.seccomp` (x86_64 only) under bubblewrap.
        cgroup: under bubblewrap, give each call a cgroup v2 with ``memory.max`` = `memory_mb` where one can be
            made (`sandbox.cgroup`; `memory_enforcement` says whether it is).
    """

    def __init__(
        self,
        name: str = "python",
        timeout: float = 10.0,
        cpu_time: float | None = None,
        memory_mb: int = 2048,
        max_processes: int = 64,
        max_file_size_mb: int = 16,
        max_open_files: int = 64,
        max_output_chars: int = 4096,
        flood_kill_bytes: int = 1 << 20,
        user: int | None = 65534,
        group: int | None = 65534,
        isolate_network: bool = True,
        persistent: bool = False,
        python_executable: str | None = None,
        workdir_root: str | None = None,
        isolation: str | None = None,
        tmpfs_mb: int = 64,
        memory_poll_s: float = 0.02,
        bwrap: str | None = None,
        seccomp: bool = True,
        cgroup: bool = True,
    ):
        # The registry's own timeout is a backstop only: the sandbox kills its process tree first.
        super().__init__(self.python, name=name, timeout=timeout + 10.0, max_output_chars=max_output_chars + 256)
        self.wall_timeout = timeout
        self.memory_limit = int(memory_mb) << 20
        self.limits = {
            "RLIMIT_CPU": int(max(1, round(cpu_time if cpu_time is not None else timeout))),
            "RLIMIT_AS": int(memory_mb) << 20,
            "RLIMIT_NPROC": int(max_processes),
            "RLIMIT_FSIZE": int(max_file_size_mb) << 20,
            "RLIMIT_NOFILE": int(max_open_files),
            "RLIMIT_CORE": 0,
        }
        self.output_limit = max_output_chars
        self.flood_kill_bytes = flood_kill_bytes
        self.is_root = os.geteuid() == 0
        self.uid, self.gid = (user, group if group is not None else user) if self.is_root else (None, None)
        self.isolate_network = isolate_network
        self.persistent = persistent
        self.workdir_root = workdir_root
        self.tmpfs_bytes = int(tmpfs_mb) << 20
        self.memory_poll_s = memory_poll_s
        self.seccomp_program = seccomp_program() if seccomp else None
        self.cgroup = CgroupParent(None, "the 'none' level")
        self._sessions: dict[Any, list[str]] = {}
        self._lock = threading.Lock()
        requested = (isolation or os.environ.get("APPO_PYTHON_ISOLATION") or "auto").strip().lower()
        if requested not in ("auto", *ISOLATION_LEVELS):
            raise ValueError(f"isolation must be 'auto', 'bubblewrap' or 'none', not {requested!r}")
        self.python_executable = python_executable or sys.executable
        self.extra_paths: list[str] = []
        if requested == "none":
            self._isolation = "none"
            self.python_executable, self.extra_paths = (
                (python_executable, []) if python_executable else sandbox_interpreter(self.uid is not None)
            )
            logger.warning(
                "PythonTool: isolation='none': model code runs with this machine's filesystem view%s. "
                "Install bubblewrap for a real sandbox.", "" if self.is_root else " and this user's permissions"
            )
        else:
            self.bwrap = bwrap or shutil.which("bwrap") or ""
            if self.is_root and self.uid is None:
                raise ValueError("PythonTool: the bubblewrap sandbox needs a user to drop to when run as root")
            info = interpreter_info(os.path.abspath(self.python_executable)) if self.bwrap else ([], [], None)
            self.site_paths, self.prefixes = info[1], info[2]
            self._command = self._bwrap_command() if self.bwrap else []
            problem = self._probe()
            if problem:
                raise SandboxUnavailable(
                    f"PythonTool cannot isolate model code: {problem}. Fix: install bubblewrap "
                    "(Debian/Ubuntu: `apt-get install bubblewrap`, Fedora: `dnf install bubblewrap`; the kernel must "
                    "allow unprivileged user namespaces), or accept a weak sandbox with PythonTool(isolation='none') "
                    "or APPO_PYTHON_ISOLATION=none."
                )
            self._isolation = "bubblewrap"
            self.cgroup = find_parent() if cgroup else CgroupParent(None, "cgroup=False")

    def python(self, code: str) -> str:
        """Run Python code in a sandbox and return what it prints (stdout and stderr).

        Args:
            code: Python source code. The value of a final bare expression is printed, as in a notebook.
        """
        return self.run(code).text

    @property
    def isolation(self) -> str:
        """The isolation level achieved: "bubblewrap" or "none" (see the module docstring)."""
        return self._isolation

    @property
    def memory_enforcement(self) -> str:
        """How a call's memory cap is enforced: "cgroup" (a cgroup v2 ``memory.max`` per call, plus the watchdog)
        or "watchdog" (the polled sum only; `cgroup.reason` says why no cgroup)."""
        return "cgroup" if self.cgroup.path else "watchdog"

    def _call_cgroup(self) -> CallCgroup | None:
        if not self.cgroup.path:
            return None
        try:
            return CallCgroup(self.cgroup.path, self.memory_limit)
        except OSError as exc:
            with self._lock:
                if self.cgroup.path:
                    logger.warning("PythonTool: cannot make a cgroup under %s (%s); the memory watchdog alone "
                                   "bounds calls from now on.", self.cgroup.path, exc)
                    self.cgroup = CgroupParent(None, f"making a cgroup under {self.cgroup.path} failed: {exc}")
            return None

    def describe_isolation(self) -> str:
        """One line for the trainer's log: the level and what it guarantees."""
        if self._isolation == "bubblewrap":
            who = f"uid {self.uid} in a user namespace" if self.uid is not None else "this uid in a user namespace"
            filt = "seccomp filter; " if self.seccomp_program else ""
            memory = ("cgroup memory.max + watchdog" if self.cgroup.path
                      else f"watchdog; no cgroup: {self.cgroup.reason}")
            return (f"{self.name}: isolation=bubblewrap ({who}; private fs, PID, network, IPC namespaces; {filt}"
                    f"per-call limits: {self.limits['RLIMIT_NPROC']} processes, {self.memory_limit >> 20} MiB "
                    f"[{memory}], {self.wall_timeout:g} s)")
        extra = ", uid drop and net/PID namespaces" if self.is_root else ""
        return f"{self.name}: isolation=none (WEAK: rlimits only{extra}; the host filesystem is visible)"

    # -- Tool hooks (sessions) ----------------------------------------------------------------------------

    def invoke(self, bound, session: Any = None) -> ToolOutput:
        code = bound.arguments.get("code", "")
        if not isinstance(code, str) or not code.strip():
            return ToolOutput("Error: empty code: nothing to run.", failed=True)
        history = self._session_cells(session)
        result = self.run(code, history)
        if self.persistent and session is not None and not result.failed:
            with self._lock:
                self._sessions.setdefault(session, []).append(code)
        return ToolOutput(result.text, failed=result.failed)

    def prime(self, session: Any, arguments: dict[str, Any] | str) -> None:
        if not self.persistent or session is None:
            return
        code = arguments if isinstance(arguments, str) else arguments.get("code", "")
        if isinstance(code, str) and code.strip():
            with self._lock:
                self._sessions.setdefault(session, []).append(code)

    def close_session(self, session: Any) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    def _session_cells(self, session: Any) -> list[str]:
        if not self.persistent or session is None:
            return []
        with self._lock:
            return list(self._sessions.get(session, []))

    # -- the sandbox --------------------------------------------------------------------------------------

    def _bwrap_command(self) -> list[str]:
        return bwrap_command(self.bwrap, self.python_executable, bootstrap_source(), is_root=self.is_root,
                             isolate_network=self.isolate_network, tmpfs_bytes=self.tmpfs_bytes,
                             seccomp=self.seccomp_program is not None)

    def _probe(self) -> str:
        """Why bubblewrap cannot run a trivial call here ('' when it can); cached per configuration."""
        if not self.bwrap:
            return "bubblewrap (`bwrap`) is not installed"
        return probe_cached(tuple(self._command), marshal.dumps(self._config(["print(6 * 7)"])),
                             self.uid is not None)

    def _mode(self) -> str:
        return self._isolation if hasattr(self, "_isolation") else "bubblewrap"

    def _config(self, cells: list[str]) -> dict[str, Any]:
        return {"mode": self._mode(), "limits": self.limits,
                "uid": self.uid, "gid": self.gid, "cells": cells, "isolate_network": self.isolate_network,
                "paths": self.extra_paths, "site": getattr(self, "site_paths", []),
                "prefix": getattr(self, "prefixes", None),
                "seccomp": self.seccomp_program if self.is_root and self._mode() == "bubblewrap" else None}

    def run(self, code: str, history: list[str] | None = None) -> SandboxResult:
        """Execute `code` (after silently replaying `history`) in a fresh sandboxed process."""
        start = time.monotonic()
        memory = False
        config = marshal.dumps(self._config([*(history or []), code]))
        workdir = None
        if self._isolation == "bubblewrap":
            popen = {"args": self._command, "cwd": "/", "env": {"PATH": "/usr/bin:/bin"}}
        else:
            import tempfile

            workdir = tempfile.mkdtemp(prefix="appo-python-", dir=self.workdir_root)
            os.chmod(workdir, 0o700)
            if self.uid is not None:
                os.chown(workdir, self.uid, self.gid)
            popen = {"args": [self.python_executable, "-I", "-u", "-c", bootstrap_source()], "cwd": workdir,
                     "env": sandbox_env(workdir, workdir)}
        cgroup = self._call_cgroup()
        fds: tuple[int, ...] = ()
        if self._isolation == "bubblewrap" and self.seccomp_program and not self.is_root:
            fds = (seccomp_pipe(self.seccomp_program),)
            popen["args"] = with_fd(popen["args"], fds[0])
        try:
            try:
                proc = subprocess.Popen(
                    **popen,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: a timeout kills the whole tree
                    pass_fds=fds,
                )
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                if cgroup is not None:  # before the bootstrap reads its configuration, so before any user code
                    try:
                        cgroup.add([proc.pid, *_descendants(proc.pid)])
                    except OSError as exc:
                        logger.warning("PythonTool: cannot move a call into %s (%s); the memory watchdog alone "
                                       "bounds this call.", cgroup.path, exc)
                        cgroup.close()
                        cgroup = None
                _feed(proc, config)
                bubblewrap = self._isolation == "bubblewrap"
                seen = read_output(proc, start + self.wall_timeout, self.output_limit, self.flood_kill_bytes,
                                   self.memory_limit if bubblewrap else None, self.memory_poll_s,
                                   tuple((path, self.tmpfs_bytes) for path in PRIVATE_TMPFS) if bubblewrap else ())
                kept, total, timed_out, flooded, memory = (seen.kept, seen.total, seen.timed_out, seen.flooded,
                                                           seen.memory_exceeded)
            finally:
                if self._isolation == "bubblewrap":
                    kill_tree(proc.pid)
                kill_group(proc.pid)
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            if cgroup is not None:
                memory = memory or cgroup.oom_killed()
                cgroup.close()
        text = kept.decode("utf-8", errors="replace")
        if total > len(kept):
            text += f"\n... [output truncated: {total - len(kept)} more bytes]"
        code_ = proc.returncode
        sig = -code_ if code_ is not None and code_ < 0 else None
        if sig is None and self._isolation == "bubblewrap" and code_ is not None and 128 < code_ < 160:
            sig = code_ - 128  # the sandbox's init reports a child killed by a signal as 128 + signal
        if timed_out:
            text += f"\nTimeoutError: execution exceeded the {self.wall_timeout:g} s time limit (process killed)"
        elif flooded:
            text += f"\n[process killed: output exceeded {self.flood_kill_bytes} bytes]"
        elif memory:
            text += (f"\nMemoryError: the call's processes and files together used more than "
                     f"{self.memory_limit >> 20} MiB (all processes killed)")
        elif sig is not None:
            text += f"\n[process killed: {_SIGNAL_REASONS.get(sig, f'signal {sig}')}]"
        if sig is not None:
            code_ = -sig  # as subprocess reports a signal, whichever level ran
        return SandboxResult(text.strip("\n"), code_, timed_out, flooded, total, time.monotonic() - start, memory)


def describe_isolation(tools: Any) -> str:
    """One line per sandboxed tool saying the isolation level achieved (for the trainer's start-up log).

    `tools` is a `ToolRegistry`, a list of tools, or None; tools without an `isolation` are skipped.
    """
    if tools is None:
        return "no tools"
    items = getattr(tools, "tools", None)
    if isinstance(items, dict):
        items = list(items.values())
    items = list(items if items is not None else tools)
    lines = [t.describe_isolation() for t in items if callable(getattr(t, "describe_isolation", None))]
    return "; ".join(lines) if lines else "no sandboxed tools"


def _descendants(pid: int) -> list[int]:
    out, stack = [], children(pid)
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children(p))
    return out


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    """Send the bootstrap its configuration; a sandbox that died before reading it shows its own error."""
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
