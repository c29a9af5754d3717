"""Sandboxed Python execution: the paper's `<python>` tool (`PythonTool`).

Each call runs the code in a fresh interpreter process in a throwaway working directory, with the output of
stdout and stderr (merged, in the order written, as a terminal shows it) read incrementally and truncated.
As the paper's tool does, a bare final expression is printed (`repr`, unless it is None).

Isolation (what a call cannot do), set up by a small bootstrap that runs in the child *before* the user's
code, so no `preexec_fn` is needed (unsafe in a multi-threaded parent, and tools run in threads):

* **Unprivileged user.** When the parent is root (sessions and CI are), the child drops to `user`/`group`
  (default 65534 `nobody`/`nogroup`; supplementary groups cleared; `PR_SET_NO_NEW_PRIVS`). This matters:
  root ignores RLIMIT_NPROC, and an unprivileged user cannot write to `/`, `/root`, the project, ...
  HOME and TMPDIR point at the throwaway directory (owned by that user). World-writable directories
  such as `/tmp` stay writable; a mount namespace would close that, but is not set up here.
* **No network.** As root the child enters new network and PID namespaces (`unshare(2)` via ctypes, since
  Python 3.11 has no `os.unshare`): only a downed loopback interface exists, so every connect fails.
  The user code then runs as PID 1 of its namespace, so when it exits (or is killed) the kernel kills
  every process it left behind, even ones that escaped the process group with `setsid()`.
* **Resource limits** (`setrlimit`): CPU seconds, address space (RLIMIT_AS), processes (RLIMIT_NPROC),
  file size (RLIMIT_FSIZE, SIGXFSZ ignored so a write fails with EFBIG instead of killing), open files,
  no core dumps. A wall-clock timeout kills the whole process group (`os.killpg`).
* **Output floods** are read in chunks; beyond `max_output_chars` bytes are discarded, and a process that
  writes more than `flood_kill_bytes` is killed at once.

Not root (a user's laptop): there is no privilege drop (the limits still apply, RLIMIT_NPROC included,
since it counts the user's processes); network isolation tries an unprivileged user namespace
(`CLONE_NEWUSER | CLONE_NEWNET`) and, where the kernel forbids that, falls back to a Python-level socket
guard that makes `socket.socket` raise. That guard is best effort, not a security boundary: run untrusted
code as root-in-a-container or in a VM. `PythonTool.isolation` reports what was achieved.

Interpreter: the child runs this interpreter, unless the sandbox user cannot read its standard library (a
pyenv Python under /root); then the system `python3.X` of the same minor version runs, with this
environment's site-packages on its path (`_sandbox_interpreter`).

Persistent sessions (`persistent=True`): a "session" is one rollout. Instead of a long-lived worker (which
would have to be forked for branches and could leak state across rollouts), each call **replays** the
session's earlier successful cells with their output suppressed, then runs the new cell. This keeps calls
stateless at the process level, makes branches trivial (a branch session is primed with the cells of its
prefix), and is deterministic for deterministic code. Costs: replay time counts against the call's limits,
and side effects of earlier cells (files, randomness) are re-run. Replayed cells that raise are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from .base import Tool, ToolOutput

logger = logging.getLogger(__name__)

# Runs in the child as the parent's user (often root), before any user code. Kept as a constant string run
# with `python -I -c`, so the sandboxed user can never tamper with it.
_BOOTSTRAP = r"""
import ast, builtins, ctypes, json, linecache, os, resource, signal, sys, traceback
cfg = json.loads(sys.argv[1])
sys.path[:0] = cfg["paths"]
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
root = os.geteuid() == 0
net = "none"
if cfg["isolate_network"]:
    flags = (CLONE_NEWNET | CLONE_NEWPID) if root else (CLONE_NEWUSER | CLONE_NEWNET)
    if libc.unshare(flags) == 0:
        net = "namespace"
    elif root and libc.unshare(CLONE_NEWNET) == 0:
        net = "namespace"
    else:
        net = "guard"
pid_ns = root and net == "namespace"
if pid_ns:
    # The child becomes PID 1 of the new PID namespace: when it exits, the kernel kills everything it left.
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        if os.WIFSIGNALED(status):  # re-raise the child's fate so the host sees the same signal
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(os.waitstatus_to_exitcode(status))
for lim, value in cfg["limits"].items():
    if value is not None:
        resource.setrlimit(getattr(resource, lim), (value, value if lim != "RLIMIT_CPU" else value + 1))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
if root and cfg["uid"] is not None:
    os.setgroups([])
    os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
    os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
if pid_ns:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # set after setuid, which clears it
if net == "guard":
    import socket
    def _no_network(*a, **k):
        raise OSError("network access is disabled in this sandbox")
    socket.socket = socket.create_connection = socket.socketpair = _no_network
del cfg["limits"]
def _show(value):
    if value is not None:
        print(repr(value))
def _compile(src, name):
    tree = ast.parse(src, name)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        call = ast.Call(func=ast.Name("__appo_show__", ast.Load()), args=[last.value], keywords=[])
        tree.body[-1] = ast.copy_location(ast.Expr(call), last)
        ast.fix_missing_locations(tree)
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)  # source lines in tracebacks
    return compile(tree, name, "exec")
g = {"__name__": "__main__", "__builtins__": builtins, "__appo_show__": _show}
cells = cfg["cells"]
out, err = sys.stdout, sys.stderr
for i, path in enumerate(cells[:-1]):  # replay of a persistent session: silent, errors skipped
    sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        exec(_compile(open(path).read(), f"<cell {i}>"), g)
    except BaseException:
        pass
    finally:
        sys.stdout, sys.stderr = out, err
try:
    code = _compile(open(cells[-1]).read(), "<cell>")
except SyntaxError as e:
    traceback.print_exception(type(e), e, None)
    sys.exit(1)
try:
    exec(code, g)
except SystemExit:
    raise
except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # drop the bootstrap's own frame
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

    @property
    def failed(self) -> bool:
        return self.timed_out or self.flooded or self.returncode != 0


class PythonTool(Tool):
    """Runs model-written Python in a sandboxed subprocess (see the module docstring for the isolation).

    Args:
        name: tool name (the tag of the tag protocol: `<python>`).
        timeout: wall-clock seconds per call; the whole process tree is killed after it.
        cpu_time: CPU seconds (RLIMIT_CPU); defaults to `timeout`.
        memory_mb: address-space limit (RLIMIT_AS) in MiB.
        max_processes: RLIMIT_NPROC (processes of the sandbox user, machine-wide).
        max_file_size_mb: RLIMIT_FSIZE in MiB.
        max_open_files: RLIMIT_NOFILE.
        max_output_chars: bytes of output kept (the rest is discarded while reading, and reported).
        flood_kill_bytes: a process that writes more than this is killed.
        user, group: uid/gid the child drops to when the parent is root (None: no drop).
        isolate_network: enter a new network namespace (or the fallbacks in the module docstring).
        persistent: replay the rollout's earlier successful cells before each call (module docstring).
        python_executable: interpreter for the child (default: this one, so the same packages exist).
        workdir_root: where throwaway directories are created (default: the system temp dir).
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
    ):
        # The registry's own timeout is a backstop only: the sandbox kills its process tree first.
        super().__init__(self.python, name=name, timeout=timeout + 10.0, max_output_chars=max_output_chars + 256)
        self.wall_timeout = timeout
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
        self.python_executable, self.extra_paths = (
            (python_executable, []) if python_executable else _sandbox_interpreter(self.uid is not None)
        )
        self.workdir_root = workdir_root
        self._sessions: dict[Any, list[str]] = {}
        self._lock = threading.Lock()
        if not self.is_root:
            logger.info("PythonTool: not running as root, so the sandbox keeps this user's privileges.")

    def python(self, code: str) -> str:
        """Run Python code in a sandbox and return what it prints (stdout and stderr).

        Args:
            code: Python source code. The value of a final bare expression is printed, as in a notebook.
        """
        return self.run(code).text

    @property
    def isolation(self) -> dict[str, Any]:
        """What this process can enforce: privilege drop, and the network mode (namespace/guard/none)."""
        return {"drops_privileges": self.uid is not None, "isolate_network": self.isolate_network,
                "root": self.is_root}

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

    def run(self, code: str, history: list[str] | None = None) -> SandboxResult:
        """Execute `code` (after silently replaying `history`) in a fresh sandboxed process."""
        start = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="appo-python-", dir=self.workdir_root)
        try:
            cells = []
            for i, src in enumerate([*(history or []), code]):
                path = os.path.join(workdir, f".cell_{i}.py")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(src)
                cells.append(path)
            os.chmod(workdir, 0o700)
            if self.uid is not None:
                os.chown(workdir, self.uid, self.gid)
            config = {"limits": self.limits, "uid": self.uid, "gid": self.gid, "cells": cells,
                      "isolate_network": self.isolate_network, "paths": self.extra_paths}
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": workdir,
                "TMPDIR": workdir,
                "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONIOENCODING": "utf-8",
                # Thread pools of numeric libraries reserve address space per thread; one is plenty.
                "OMP_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            }
            proc = subprocess.Popen(
                [self.python_executable, "-I", "-u", "-c", _BOOTSTRAP, json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
                start_new_session=True,  # own process group: a timeout kills the whole tree
            )
            try:
                kept, total, timed_out, flooded = self._read_output(proc, start + self.wall_timeout)
            finally:
                _kill_group(proc.pid)
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        text = kept.decode("utf-8", errors="replace")
        if total > len(kept):
            text += f"\n... [output truncated: {total - len(kept)} more bytes]"
        if timed_out:
            text += f"\nTimeoutError: execution exceeded the {self.wall_timeout:g} s time limit (process killed)"
        elif flooded:
            text += f"\n[process killed: output exceeded {self.flood_kill_bytes} bytes]"
        elif proc.returncode is not None and proc.returncode < 0:
            sig = -proc.returncode
            reason = _SIGNAL_REASONS.get(sig, f"signal {sig}")
            text += f"\n[process killed: {reason}]"
        return SandboxResult(text.strip("\n"), proc.returncode, timed_out, flooded, total, time.monotonic() - start)

    def _read_output(self, proc: subprocess.Popen, deadline: float) -> tuple[bytes, int, bool, bool]:
        """Read merged stdout/stderr in chunks until EOF, the deadline, or a flood; keep only the head."""
        kept = bytearray()
        total = 0
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return bytes(kept), total, True, False
                if not sel.select(timeout=remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                total += len(chunk)
                if len(kept) < self.output_limit:
                    kept += chunk[: self.output_limit - len(kept)]
                if total > self.flood_kill_bytes:
                    return bytes(kept), total, False, True
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # closed its output but keeps running
            return bytes(kept), total, True, False
        return bytes(kept), total, False, False


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
    """Pick an interpreter whose standard library the unprivileged sandbox user can read.

    A pyenv/conda Python installed under /root starts fine in the child (it starts as root) but cannot import
    anything after the privilege drop. Then use the system Python of the same minor version and put this
    environment's site-packages (when world-readable) on its path, so numpy/sympy stay available.
    """
    import site
    import sysconfig

    if not drops_privileges or _world_readable(sysconfig.get_paths()["stdlib"]):
        return sys.executable, []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = [p for p in site.getsitepackages() if os.path.isdir(p) and _world_readable(p)]
    for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        if os.path.exists(candidate) and _world_readable(f"/usr/lib/python{version}"):
            return candidate, paths
    logger.warning(
        "PythonTool: the standard library of %s is not readable by the sandbox user and no system "
        "python%s was found; sandboxed code can only use modules imported before the privilege drop.",
        sys.executable,
        version,
    )
    return sys.executable, paths


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
