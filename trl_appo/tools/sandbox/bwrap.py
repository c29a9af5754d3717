"""The bubblewrap command of a call: namespaces, the read-only mounts of the interpreter, the private tmpfs."""

from __future__ import annotations

import functools
import json
import os
import site
import subprocess
import sys
import sysconfig

from .seccomp import SECCOMP_FD, seccomp_pipe, seccomp_program, with_fd

SANDBOX_ROOT = "/sandbox"
"""The per-call working directory (a private tmpfs) inside the bubblewrap sandbox."""

PRIVATE_TMPFS = ("/tmp", SANDBOX_ROOT, "/dev/shm")
"""The writable, size-capped tmpfs of a call (what they hold counts against its memory cap)."""


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be set up on this machine (the message says how to fix it)."""


def sandbox_env(home: str, tmp: str) -> dict[str, str]:
    """The whole environment of a call (the host's is cleared)."""
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


def bwrap_command(bwrap: str, python_executable: str, bootstrap: str, *, is_root: bool, isolate_network: bool,
                  tmpfs_bytes: int, seccomp: bool) -> list[str]:
    """The bwrap command line of every call (cached by the tool; `SECCOMP_FD` is replaced per call)."""
    tmpfs = ["--size", str(tmpfs_bytes)]
    cmd = [bwrap, "--die-with-parent", "--new-session", "--as-pid-1", "--clearenv",
           "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
    if isolate_network:
        cmd.append("--unshare-net")
    if is_root:  # bwrap runs privileged; the bootstrap drops to the sandbox uid, then enters a user namespace
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--disable-userns"]
    # The tmpfs mounts come first, so an interpreter under /tmp or the working directory's path still shows.
    cmd += ["--perms", "1777", *tmpfs, "--tmpfs", "/tmp", "--perms", "0777", *tmpfs, "--tmpfs", SANDBOX_ROOT]
    made: set[str] = set()
    for path in readonly_paths(python_executable):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):  # traversable parents (bwrap would copy /root's 0700)
            parent = "/" + "/".join(parts[:i])
            if parent not in made and parent not in (SANDBOX_ROOT, "/tmp"):
                made.add(parent)
                cmd += ["--perms", "0755", "--dir", parent]
        cmd += ["--ro-bind", path, path]
    for link, target in root_links():
        cmd += ["--symlink", target, link]
    # /dev is bwrap's own tmpfs, without a size cap and (as a normal user) writable: read-only, like /.
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", *tmpfs, "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", SANDBOX_ROOT]
    for key, value in sandbox_env(SANDBOX_ROOT, "/tmp").items():
        cmd += ["--setenv", key, value]
    if seccomp and not is_root:
        cmd += ["--seccomp", SECCOMP_FD]  # the fd is a pipe holding the program (`seccomp_pipe`)
    return [*cmd, "--", python_executable, "-I", "-S", "-u", "-c", bootstrap]


@functools.lru_cache(maxsize=None)
def probe_cached(command: tuple[str, ...], config: bytes, drops: bool) -> str:
    """Why `command` cannot run a trivial call (`config` prints 42) here; '' when it can."""
    fds = (seccomp_pipe(seccomp_program()),) if "--seccomp" in command else ()
    try:
        args = with_fd(list(command), fds[0]) if fds else list(command)
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


def readonly_paths(executable: str) -> list[str]:
    """Host paths the sandbox sees read-only: /usr, the loader cache, the interpreter, its venv and packages."""
    paths = ["/usr", "/etc/ld.so.cache", "/etc/alternatives"]
    paths += interpreter_info(os.path.abspath(executable))[0]
    out: list[str] = []
    for p in sorted({os.path.realpath(p) for p in paths if os.path.exists(p)} |
                    {os.path.abspath(p) for p in paths if os.path.exists(p)}, key=len):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


@functools.lru_cache(maxsize=None)
def interpreter_info(executable: str) -> tuple[list[str], list[str], list[str] | None]:
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


def root_links() -> list[tuple[str, str]]:
    """Top-level merged-/usr links (/bin -> usr/bin, ...) recreated in the sandbox."""
    links = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
    return links
