"""Process-level helpers shared by the `trl-appo` command, the training script and the demo: third-party noise on
stderr, and the torch CPU thread count. Light (standard library only; torch is imported where threads are set).

* `quiet_known_noise()`: two third-party messages that no user of this package can act on are lowered to ERROR
  (only where nobody configured those loggers): bitsandbytes' "Failed to load CPU gemm_4bit_forward ..." (printed
  at import on CPUs with AVX512-BF16 when the optional `kernels` hub kernel is not cached; bitsandbytes then uses
  its own CPU kernel) and `kernels`' "Skipping publisher trust check ... offline mode" (printed by the same lookup
  under HF_HUB_OFFLINE=1).
* `held_stderr()`: the command's one-line contract for bad input must hold whatever any third-party package
  prints while the heavy imports, the config parsing and the wiring run. Everything written to stderr in that phase
  (file descriptor 2 and `sys.stderr`) is held back: on a bad-input error it is dropped, so the error is the only
  line; otherwise (success or an unexpected error) it is passed on unchanged, so no warning is lost.
* `choose_threads()` / `set_cpu_threads()`: on a CPU shared with busy processes, torch's OpenMP threads wait on
  each other at every small matmul (measured on 2 busy cores: `trl-appo train --config cpu/demo.yaml` 34-59 s of
  train_runtime with 2 threads vs 1.1 s with one; `eval --limit 16` 175 s vs 41 s). All cores on an idle machine,
  fewer when the load average says the cores are taken; left alone when the user chose (OMP_NUM_THREADS or
  MKL_NUM_THREADS set, or an explicit count passed in).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")
"""Loggers `quiet_known_noise` lowers to ERROR (see the module docstring for what they print and why it is noise)."""


def quiet_known_noise() -> None:
    """Lower `NOISY_LOGGERS` to ERROR, leaving alone any the caller already configured."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


class _StderrProxy:
    """`sys.stderr` while held. Objects that grab `sys.stderr` in that phase (logging handlers, progress bars)
    keep this proxy, which writes to the real stderr again once the hold ends."""

    def __init__(self, target):
        self.target = target

    def write(self, text):
        return self.target.write(text)

    def flush(self):
        self.target.flush()

    def __getattr__(self, name):
        return getattr(self.target, name)


@contextlib.contextmanager
def held_stderr(discard_on: tuple[type[BaseException], ...] = ()):
    """Hold back everything written to stderr inside the block (fd 2 and `sys.stderr`).

    On an exception of a type in `discard_on` (bad input: the caller prints its own one line) what was held is
    dropped; otherwise it is written to stderr when the block ends, in order. `TRL_APPO_SHOW_STDERR=1` turns the
    hold off (debugging).
    """
    if os.environ.get("TRL_APPO_SHOW_STDERR") == "1":
        yield
        return
    original = sys.stderr
    try:
        original.flush()
        saved_fd = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (an embedded interpreter): hold nothing
        yield
        return
    sink = tempfile.TemporaryFile()
    os.dup2(sink.fileno(), 2)
    # A second descriptor on the same open file shares its offset, so Python-level and fd-level writes interleave.
    text = open(os.dup(sink.fileno()), "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    proxy = _StderrProxy(text)
    sys.stderr = proxy
    discard = False
    try:
        yield
    except discard_on:
        discard = True
        raise
    finally:
        with contextlib.suppress(Exception):
            text.flush()
        proxy.target = original
        if sys.stderr is proxy:
            sys.stderr = original
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        text.close()
        sink.seek(0)
        held = sink.read().decode("utf-8", errors="replace")
        sink.close()
        if held and not discard:
            original.write(held)
            original.flush()


def choose_threads() -> int:
    """All cores on an idle machine; the cores the load average leaves free (at least 1) on a busy one."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return cores
    return cores if load < 0.75 else max(1, min(cores, int(cores - load)))


def user_chose_threads() -> bool:
    """Whether the user chose the thread count for this process: OMP_NUM_THREADS or MKL_NUM_THREADS is set."""
    return bool(os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"))


def set_cpu_threads(threads: int | None = None) -> tuple[int, str]:
    """Set torch's CPU thread count: `threads` when given, else `choose_threads()` unless the user chose.

    Returns (threads in use, one line saying why) for the caller to print or log.
    """
    import torch

    if threads is None and user_chose_threads():
        n = torch.get_num_threads()
        return n, f"torch threads: {n} (OMP_NUM_THREADS / MKL_NUM_THREADS)"
    n = threads or choose_threads()
    torch.set_num_threads(n)
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        load = "unknown"
    why = "" if threads else "; OMP_NUM_THREADS overrides"
    return n, f"torch threads: {n} (cores {os.cpu_count()}, load average {load}{why})"
