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
    size-capped tmpfs as working directory (``/sandbox``, also ``$HOME``), ``/tmp`` and ``/dev/shm``; a minimal
    ``/dev``; a ``/proc`` of its own PID namespace. No ``$HOME``, project, data directory, ``/run`` or
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
    ``tmpfs_mb``; and the memory of the whole call (resident anonymous + shmem memory summed over its
    processes) is polled every ``memory_poll_s`` by the parent, which kills the call above ``memory_mb``.
    Without cgroups this sum is a watchdog, not an allocator limit: between two polls a call can overshoot
    by what it allocates in that interval (each process is still bounded by RLIMIT_AS). CPU time is capped
    per process (RLIMIT_CPU) and per call by the wall-clock timeout, which kills the whole namespace.
  - the interpreter starts with ``-I -S``: its site-packages are on ``sys.path`` but their ``.pth`` files are
    not run (they cost ~30 ms per call; editable installs of project code would not be visible anyway).
  - ``isolate_network=False`` shares the host's network namespace (and so its abstract unix sockets).
  - a seccomp filter (x86_64; `_seccomp_program`): ptrace and process_vm_*, unshare/setns/mount and clone
    with namespace flags (no nested namespaces), keyrings, bpf, perf, userfaultfd, io_uring, module/kexec
    loading, file handles, clock setting, reboot, syslog fail with EPERM; clone3 with ENOSYS (libc falls back
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

import functools
import json
import logging
import marshal
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from typing import Any

from .base import Tool, ToolOutput

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("bubblewrap", "none")
"""Levels a `PythonTool` can run at, strongest first (``"auto"`` picks the first that works, or refuses)."""

SANDBOX_ROOT = "/sandbox"
"""The per-call working directory (a private tmpfs) inside the bubblewrap sandbox."""


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up on this machine (the message says how to fix it)."""


# Runs in the child before any user code; the configuration (limits, cells) arrives as JSON on stdin.
# Kept as a constant string run with `python -I -c`, so the sandboxed code can never tamper with it.
_BOOTSTRAP = r"""
import _ast, _signal, builtins, marshal, os, resource, sys  # builtin modules only: fast start
cfg = marshal.loads(sys.stdin.buffer.read())
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
sys.path[:0] = cfg["paths"]
sys.path += cfg.get("site", [])  # -S: site-packages without running .pth files (fast start)
if cfg.get("prefix"):  # what site.py would set in a venv
    sys.prefix, sys.exec_prefix = cfg["prefix"]
root = os.geteuid() == 0
# ctypes (slow to import) only where a syscall Python 3.11 lacks is needed: as root, and at the "none" level.
need_libc = root or cfg["mode"] != "bubblewrap"
if need_libc:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
def _fail(what):
    sys.stderr.write("sandbox setup failed: %s: %s\n" % (what, os.strerror(ctypes.get_errno())))
    sys.stderr.flush()
    os._exit(125)
def _drop(uid, gid):
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
def _no_caps():
    class _Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class _Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    if libc.capset(ctypes.byref(_Hdr(0x20080522, 0)), (_Data * 2)()) != 0:
        _fail("capset")
def _limits():  # after the user namespace exists: RLIMIT_NPROC counts per (user namespace, uid), i.e. per call
    for lim, value in cfg["limits"].items():
        if value is not None:
            resource.setrlimit(getattr(resource, lim), (value, value if lim != "RLIMIT_CPU" else value + 1))
def _init(child):
    # The init of the call's PID namespace (bwrap --as-pid-1). The user's code is its child: when that exits,
    # init exits and the kernel kills everything the code left behind in the namespace. Init keeps the
    # caller's uid (root: with no capabilities left), so the code cannot signal or trace it, while the dying
    # bwrap can still deliver the --die-with-parent SIGKILL to it.
    if root:  # (not root: bwrap's --die-with-parent PDEATHSIG is still set)
        _no_caps()
        libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
pid1 = False
if cfg["mode"] == "bubblewrap":
    _child = os.fork()
    if _child:
        _init(_child)
    if cfg["uid"] is not None:  # host root: bwrap mounted as root; become the sandbox user in a user namespace
        _drop(cfg["uid"], cfg["gid"])
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE (reset by setuid), or /proc/self/uid_map stays root's
        if libc.unshare(CLONE_NEWUSER) != 0:
            _fail("unshare(CLONE_NEWUSER)")
        for name, text in (("uid_map", "%d %d 1" % ((cfg["uid"],) * 2)), ("setgroups", "deny"),
                           ("gid_map", "%d %d 1" % ((cfg["gid"],) * 2))):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
        _no_caps()  # those the new user namespace grants
        libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
    _limits()
else:
    net = "none"
    if cfg["isolate_network"]:
        flags = (CLONE_NEWNET | CLONE_NEWPID) if root else (CLONE_NEWUSER | CLONE_NEWNET)
        if libc.unshare(flags) == 0:
            net = "namespace"
        elif root and libc.unshare(CLONE_NEWNET) == 0:
            net = "namespace"
        else:
            net = "guard"
    pid1 = root and net == "namespace"
    if pid1:
        _child = os.fork()
        if _child:
            _init(_child)
    _limits()
_signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
if cfg["mode"] != "bubblewrap" and root and cfg["uid"] is not None:
    _drop(cfg["uid"], cfg["gid"])
if need_libc:  # (bwrap sets it for its sandbox)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
if cfg.get("seccomp"):  # as root, installed here, after the bootstrap's own unshare (else bwrap --seccomp does it)
    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    _prog = ctypes.create_string_buffer(cfg["seccomp"], len(cfg["seccomp"]))
    if libc.prctl(22, 2, ctypes.byref(_Fprog(len(cfg["seccomp"]) // 8, ctypes.addressof(_prog))), 0, 0) != 0:
        _fail("seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
if pid1:
    libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)  # set after setuid, which clears it
if cfg["mode"] != "bubblewrap" and net == "guard":
    import socket
    def _no_network(*a, **k):
        raise OSError("network access is disabled in this sandbox")
    socket.socket = socket.create_connection = socket.socketpair = _no_network
cells = cfg["cells"]
del cfg, _drop, _fail, _init, _limits, _no_caps
def _show(value):
    if value is not None:
        print(repr(value))
_sources = {}
def _compile(src, name):
    _sources[name] = src
    tree = compile(src, name, "exec", _ast.PyCF_ONLY_AST)  # the `ast` module itself is slow to import
    if tree.body and isinstance(tree.body[-1], _ast.Expr):
        last = tree.body[-1]
        pos = {k: getattr(last, k) for k in ("lineno", "col_offset", "end_lineno", "end_col_offset")}
        func = _ast.Name("__appo_show__", _ast.Load(), **pos)
        tree.body[-1] = _ast.Expr(_ast.Call(func, [last.value], [], **pos), **pos)
    return compile(tree, name, "exec")
def _print_exception(e, tb):
    import linecache, traceback
    for name, src in _sources.items():  # source lines of the cells in the traceback
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    traceback.print_exception(type(e), e, tb)
g = {"__name__": "__main__", "__builtins__": builtins, "__appo_show__": _show}
out, err = sys.stdout, sys.stderr
for i, src in enumerate(cells[:-1]):  # replay of a persistent session: silent, errors skipped
    sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        exec(_compile(src, f"<cell {i}>"), g)
    except BaseException:
        pass
    finally:
        sys.stdout, sys.stderr = out, err
try:
    code = _compile(cells[-1], "<cell>")
except (SyntaxError, ValueError) as e:  # ValueError: null bytes in the source
    _print_exception(e, None)
    sys.exit(1)
try:
    exec(code, g)
except SystemExit:
    raise
except BaseException as e:
    _print_exception(e, e.__traceback__.tb_next)  # drop the bootstrap's own frame
    sys.exit(1)
"""

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
        seccomp: add the seccomp filter of `_seccomp_program` (x86_64 only) under bubblewrap.
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
        self.seccomp_program = _seccomp_program() if seccomp else None
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
                (python_executable, []) if python_executable else _sandbox_interpreter(self.uid is not None)
            )
            logger.warning(
                "PythonTool: isolation='none': model code runs with this machine's filesystem view%s. "
                "Install bubblewrap for a real sandbox.", "" if self.is_root else " and this user's permissions"
            )
        else:
            self.bwrap = bwrap or shutil.which("bwrap") or ""
            if self.is_root and self.uid is None:
                raise ValueError("PythonTool: the bubblewrap sandbox needs a user to drop to when run as root")
            info = _interpreter_info(os.path.abspath(self.python_executable)) if self.bwrap else ([], [], None)
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

    def describe_isolation(self) -> str:
        """One line for the trainer's log: the level and what it guarantees."""
        if self._isolation == "bubblewrap":
            who = f"uid {self.uid} in a user namespace" if self.uid is not None else "this uid in a user namespace"
            filt = "seccomp filter; " if self.seccomp_program else ""
            return (f"{self.name}: isolation=bubblewrap ({who}; private fs, PID, network, IPC namespaces; {filt}"
                    f"per-call limits: {self.limits['RLIMIT_NPROC']} processes, {self.memory_limit >> 20} MiB, "
                    f"{self.wall_timeout:g} s)")
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
        tmpfs = ["--size", str(self.tmpfs_bytes)]
        cmd = [self.bwrap, "--die-with-parent", "--new-session", "--as-pid-1", "--clearenv",
               "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        if self.isolate_network:
            cmd.append("--unshare-net")
        if self.is_root:  # bwrap runs privileged; the bootstrap drops to self.uid, then enters a user namespace
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            cmd += ["--unshare-user", "--disable-userns"]
        # The tmpfs mounts come first, so an interpreter under /tmp or the working directory's path still shows.
        cmd += ["--perms", "1777", *tmpfs, "--tmpfs", "/tmp", "--perms", "0777", *tmpfs, "--tmpfs", SANDBOX_ROOT]
        made: set[str] = set()
        for path in _readonly_paths(self.python_executable):
            parts = path.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):  # traversable parents (bwrap would copy /root's 0700)
                parent = "/" + "/".join(parts[:i])
                if parent not in made and parent not in (SANDBOX_ROOT, "/tmp"):
                    made.add(parent)
                    cmd += ["--perms", "0755", "--dir", parent]
            cmd += ["--ro-bind", path, path]
        for link, target in _root_links():
            cmd += ["--symlink", target, link]
        cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", *tmpfs, "--tmpfs", "/dev/shm",
                "--remount-ro", "/", "--chdir", SANDBOX_ROOT]
        for key, value in self._env(SANDBOX_ROOT, "/tmp").items():
            cmd += ["--setenv", key, value]
        if self.seccomp_program and not self.is_root:
            cmd += ["--seccomp", _SECCOMP_FD]  # the fd is a pipe holding the program (`_seccomp_pipe`)
        return [*cmd, "--", self.python_executable, "-I", "-S", "-u", "-c", _BOOTSTRAP]

    def _env(self, home: str, tmp: str) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONIOENCODING": "utf-8",
            # Thread pools of numeric libraries reserve address space per thread; one is plenty.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }

    def _probe(self) -> str:
        """Why bubblewrap cannot run a trivial call here ('' when it can); cached per configuration."""
        if not self.bwrap:
            return "bubblewrap (`bwrap`) is not installed"
        return _probe_cached(tuple(self._command), marshal.dumps(self._config(["print(6 * 7)"])),
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
            popen = {"args": [self.python_executable, "-I", "-u", "-c", _BOOTSTRAP], "cwd": workdir,
                     "env": self._env(workdir, workdir)}
        fds: tuple[int, ...] = ()
        if self._isolation == "bubblewrap" and self.seccomp_program and not self.is_root:
            fds = (_seccomp_pipe(self.seccomp_program),)
            popen["args"] = _with_fd(popen["args"], fds[0])
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
                _feed(proc, config)
                kept, total, timed_out, flooded, memory = self._read_output(proc, start + self.wall_timeout)
            finally:
                if self._isolation == "bubblewrap":
                    _kill_tree(proc.pid)
                _kill_group(proc.pid)
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
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
            text += (f"\nMemoryError: the call's processes together used more than {self.memory_limit >> 20} MiB "
                     "(all processes killed)")
        elif sig is not None:
            text += f"\n[process killed: {_SIGNAL_REASONS.get(sig, f'signal {sig}')}]"
        if sig is not None:
            code_ = -sig  # as subprocess reports a signal, whichever level ran
        return SandboxResult(text.strip("\n"), code_, timed_out, flooded, total, time.monotonic() - start, memory)

    def _read_output(self, proc: subprocess.Popen, deadline: float) -> tuple[bytes, int, bool, bool, bool]:
        """Read merged stdout/stderr in chunks until EOF, the deadline, a flood or too much memory."""
        kept = bytearray()
        total = 0
        fd = proc.stdout.fileno()
        watch = self._isolation == "bubblewrap" and self.memory_poll_s > 0
        next_poll = time.monotonic() + self.memory_poll_s
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    return bytes(kept), total, True, False, False
                if watch and now >= next_poll:
                    next_poll = now + self.memory_poll_s
                    if _tree_memory(proc.pid) > self.memory_limit:
                        return bytes(kept), total, False, False, True
                ready = sel.select(timeout=min(remaining, self.memory_poll_s) if watch else remaining)
                if not ready:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                total += len(chunk)
                if len(kept) < self.output_limit:
                    kept += chunk[: self.output_limit - len(kept)]
                if total > self.flood_kill_bytes:
                    return bytes(kept), total, False, True, False
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # closed its output but keeps running
            return bytes(kept), total, True, False, False
        return bytes(kept), total, False, False, False


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


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    """Send the bootstrap its configuration; a sandbox that died before reading it shows its own error."""
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass
    return out


def _tree_memory(pid: int) -> int:
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
        stack.extend(_children(p))
    return total


def _kill_tree(bwrap_pid: int) -> None:
    """Kill the init of the call's PID namespace (bwrap's child): the kernel then kills the whole namespace."""
    for pid in _children(bwrap_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@functools.lru_cache(maxsize=None)
def _probe_cached(command: tuple[str, ...], config: bytes, drops: bool) -> str:
    fds = (_seccomp_pipe(_seccomp_program()),) if "--seccomp" in command else ()
    try:
        args = _with_fd(list(command), fds[0]) if fds else list(command)
        out = subprocess.run(args, input=config, capture_output=True, timeout=60,
                             cwd="/", env={"PATH": "/usr/bin:/bin"}, pass_fds=fds)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap did not run ({exc})"
    finally:
        for fd in fds:
            os.close(fd)
    if out.returncode == 0 and out.stdout.strip() == b"42":
        return ""
    msg = (out.stdout + out.stderr).decode(errors="replace").strip().splitlines()
    return f"a test call in bubblewrap failed ({msg[-1] if msg else f'exit status {out.returncode}'})"


# -- seccomp ------------------------------------------------------------------------------------------------

_SECCOMP_FD = "SECCOMP_FD"
"""Placeholder in the cached bwrap command, replaced per call by the fd of a pipe holding the program."""

# x86_64 syscall numbers (asm/unistd_64.h) refused with EPERM: tracing and other processes' memory, kernel
# keyrings, eBPF, perf, userfaultfd, io_uring, namespaces and mounts (no nested sandboxes to hide in), module
# and kexec loading, handles to host files, clocks, swap, reboot, syslog.
_SECCOMP_DENY_X86_64 = (
    101, 310, 311,  # ptrace, process_vm_readv, process_vm_writev
    248, 249, 250,  # add_key, request_key, keyctl
    321, 298, 323,  # bpf, perf_event_open, userfaultfd
    425, 426, 427,  # io_uring_setup, io_uring_enter, io_uring_register
    272, 308, 165, 166, 155, 161,  # unshare, setns, mount, umount2, pivot_root, chroot
    428, 429, 430, 431, 432, 433, 442,  # open_tree, move_mount, fsopen, fsconfig, fsmount, fspick, mount_setattr
    175, 313, 176, 246, 320,  # init_module, finit_module, delete_module, kexec_load, kexec_file_load
    303, 304, 212, 180,  # name_to_handle_at, open_by_handle_at, lookup_dcookie, nfsservctl
    163, 167, 168, 169, 103,  # acct, swapon, swapoff, reboot, syslog
    153, 172, 173, 179,  # vhangup, iopl, ioperm, quotactl
    164, 227, 305, 159,  # settimeofday, clock_settime, clock_adjtime, adjtimex
)
_CLONE_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET


@functools.lru_cache(maxsize=None)
def _seccomp_program() -> bytes | None:
    """A classic-BPF seccomp filter (x86_64; None elsewhere): the syscalls above fail with EPERM, clone with a
    namespace flag fails with EPERM, clone3 with ENOSYS (its flags cannot be inspected; libc falls back to
    clone), x32 and foreign-arch syscalls with ENOSYS; everything else is allowed."""
    import platform
    import struct

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    deny = list(dict.fromkeys(_SECCOMP_DENY_X86_64))
    n = len(deny)
    # layout: 0 arch, 1 check, 2 ret enosys, 3 nr, 4 x32, 5 clone3, 6 clone, 7.. deny list, ret allow,
    # clone check (load flags, test, ret eperm, ret allow), ret enosys
    i_allow = 7 + n
    i_clone = i_allow + 1
    i_eperm = i_clone + 2
    i_enosys = i_clone + 4
    prog = [
        (ld, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, 0xC000003E),  # AUDIT_ARCH_X86_64
        (ret, 0, 0, enosys),
        (ld, 0, 0, 0),  # seccomp_data.nr
        (jge, i_enosys - 4 - 1, 0, 0x40000000),  # the x32 ABI
        (jeq, i_enosys - 5 - 1, 0, 435),  # clone3
        (jeq, i_clone - 6 - 1, 0, 56),  # clone
        *[(jeq, i_eperm - (7 + k) - 1, 0, nr) for k, nr in enumerate(deny)],
        (ret, 0, 0, allow),
        (ld, 0, 0, 16),  # clone flags: args[0], low 32 bits
        (jset, 0, 1, _CLONE_NAMESPACE_FLAGS),
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
        (ret, 0, 0, enosys),
    ]
    assert prog[i_allow] == (ret, 0, 0, allow) and prog[i_clone] == (ld, 0, 0, 16)
    assert prog[i_eperm] == (ret, 0, 0, eperm) and prog[i_enosys] == (ret, 0, 0, enosys) == prog[-1]
    assert max(p[1] for p in prog) < 256  # (the clone check's "ret eperm" doubles as the deny list's target)
    return b"".join(struct.pack("<HBBI", *p) for p in prog)


def _seccomp_pipe(program: bytes) -> int:
    """A pipe's read end holding `program` (passed with `pass_fds`, which keeps its number in the child)."""
    r, w = os.pipe()
    try:
        os.write(w, program)  # ~0.5 KB: fits the pipe buffer
    finally:
        os.close(w)
    return r


def _with_fd(command: list[str], fd: int) -> list[str]:
    return [str(fd) if arg == _SECCOMP_FD else arg for arg in command]


def _readonly_paths(executable: str) -> list[str]:
    """Host paths the sandbox sees read-only: /usr, the loader cache, the interpreter, its venv and packages."""
    paths = ["/usr", "/etc/ld.so.cache", "/etc/alternatives"]
    paths += _interpreter_info(os.path.abspath(executable))[0]
    out: list[str] = []
    for p in sorted({os.path.realpath(p) for p in paths if os.path.exists(p)} |
                    {os.path.abspath(p) for p in paths if os.path.exists(p)}, key=len):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


@functools.lru_cache(maxsize=None)
def _interpreter_info(executable: str) -> tuple[list[str], list[str], list[str] | None]:
    """(directories to mount, site-packages directories, [sys.prefix, sys.exec_prefix]) of `executable`
    (this process's, or asked from the interpreter)."""
    probe = ("import json, site, sys, sysconfig; print(json.dumps([[sys.prefix, sys.base_prefix, sys.exec_prefix, "
             "sys.base_exec_prefix, *sysconfig.get_paths().values()], site.getsitepackages()]))")
    if executable == os.path.abspath(sys.executable):
        paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sysconfig.get_paths().values()]
        sites = site.getsitepackages()
    else:
        out = subprocess.run([executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60)
        paths, sites = json.loads(out.stdout) if out.returncode == 0 else ([], [])
    sites = [p for p in dict.fromkeys(sites) if os.path.isdir(p)]
    binds = [p for p in [*paths, *sites, os.path.dirname(executable)] if p and os.path.isdir(p) and p != "/"]
    return binds, sites, (paths[0], paths[2]) if len(paths) > 2 else None


def _root_links() -> list[tuple[str, str]]:
    """Top-level merged-/usr links (/bin -> usr/bin, ...) recreated in the sandbox."""
    links = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
    return links


def _world_readable(path: str) -> bool:
    """True if a user with no relation to the owner can reach and list `path` (o+x on every parent, o+r)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        try:
            mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


def _sandbox_interpreter(drops_privileges: bool) -> tuple[str, list[str]]:
    """"none" level only: an interpreter whose standard library *and* packages the sandbox user can read.

    A pyenv/conda Python under /root cannot import anything after the privilege drop. Then the system Python
    of the same minor version runs with this environment's site-packages on its path, but only if all of
    them are readable, so the user's packages are present; otherwise this fails with the fix.
    """
    if not drops_privileges or _world_readable(sysconfig.get_paths()["stdlib"]):
        return sys.executable, []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    packages = [p for p in site.getsitepackages() if os.path.isdir(p)]
    if all(_world_readable(p) for p in packages):
        for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
            if os.path.exists(candidate) and _world_readable(f"/usr/lib/python{version}"):
                logger.warning("PythonTool(isolation='none'): the sandbox user cannot read %s's standard library; "
                               "running %s with this environment's site-packages %s instead.",
                               sys.executable, candidate, packages)
                return candidate, packages
    raise SandboxUnavailable(
        f"PythonTool(isolation='none'): the sandbox user cannot read {sys.executable}'s standard library or "
        "packages. Fix: install bubblewrap and use the default isolation (it mounts the interpreter read-only), "
        "or pass user=None (no privilege drop)."
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
