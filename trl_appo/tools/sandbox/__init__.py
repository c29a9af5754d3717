"""The machinery of `trl_appo.tools.PythonTool`'s sandbox, one file per concern.

* `bwrap`: the bubblewrap command of a call (namespaces, read-only mounts of the interpreter, private tmpfs).
* `seccomp`: the seccomp filter (x86_64) and how it reaches the sandbox.
* `watchdog`: the parent's side of a call: output reading, the memory watchdog (processes and private
  tmpfs), killing the call.
* `cgroup`: a cgroup v2 ``memory.max`` per call, where this process may make memory-controlled cgroups.
* `bootstrap`: the first code run inside the sandbox (a script, passed with ``-c``: never imported).
* `legacy`: the interpreter of the weak, opt-in ``"none"`` level.

`trl_appo.tools.python` documents the isolation as a whole; `PythonTool` is the public API.
"""

from __future__ import annotations

import functools
import os

from .bwrap import SANDBOX_ROOT, SandboxUnavailable, bwrap_command, sandbox_env


@functools.lru_cache(maxsize=None)
def bootstrap_source() -> str:
    """The text of `bootstrap.py`: read here, passed to the sandbox's interpreter on its command line (so the
    sandbox needs no view of this package, and its code can never rewrite the bootstrap)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap.py"), encoding="utf-8") as f:
        return f.read()


__all__ = ["SANDBOX_ROOT", "SandboxUnavailable", "bootstrap_source", "bwrap_command", "sandbox_env"]
