"""The "none" level (opt-in, weak): which interpreter the sandbox user can run after the privilege drop."""

from __future__ import annotations

import logging
import os
import site
import sys
import sysconfig

from .bwrap import SandboxUnavailable

logger = logging.getLogger("trl_appo.tools.python")


def world_readable(path: str) -> bool:
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


def sandbox_interpreter(drops_privileges: bool) -> tuple[str, list[str]]:
    """"none" level only: an interpreter whose standard library *and* packages the sandbox user can read.

    A pyenv/conda Python under /root cannot import anything after the privilege drop. Then the system Python
    of the same minor version runs with this environment's site-packages on its path, but only if all of
    them are readable, so the user's packages are present; otherwise this fails with the fix.
    """
    if not drops_privileges or world_readable(sysconfig.get_paths()["stdlib"]):
        return sys.executable, []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    packages = [p for p in site.getsitepackages() if os.path.isdir(p)]
    if all(world_readable(p) for p in packages):
        for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
            if os.path.exists(candidate) and world_readable(f"/usr/lib/python{version}"):
                logger.warning("PythonTool(isolation='none'): the sandbox user cannot read %s's standard library; "
                               "running %s with this environment's site-packages %s instead.",
                               sys.executable, candidate, packages)
                return candidate, packages
    raise SandboxUnavailable(
        f"PythonTool(isolation='none'): the sandbox user cannot read {sys.executable}'s standard library or "
        "packages. Fix: install bubblewrap and use the default isolation (it mounts the interpreter read-only), "
        "or pass user=None (no privilege drop)."
    )
