"""The seccomp filter of the bubblewrap sandbox (x86_64): a classic-BPF program and how it reaches the sandbox.

As a normal user bubblewrap installs it (``--seccomp FD``, the read end of a pipe holding the program); as root
the bootstrap installs it after its own ``unshare(CLONE_NEWUSER)`` (the program travels in its configuration).
"""

from __future__ import annotations

import functools
import os

SECCOMP_FD = "SECCOMP_FD"
"""Placeholder in the cached bwrap command, replaced per call by the fd of a pipe holding the program."""

# x86_64 syscall numbers (asm/unistd_64.h) refused with EPERM: tracing and other processes' memory, kernel
# keyrings, eBPF, perf, userfaultfd, io_uring, namespaces and mounts (no nested sandboxes to hide in), module
# and kexec loading, handles to host files, clocks, swap, reboot, syslog; and memory no process's RSS shows
# (memfds, SysV shared memory, semaphores and message queues: the watchdog could not count them).
DENY_X86_64 = (
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
    319, 447,  # memfd_create, memfd_secret
    29, 30, 31, 67,  # shmget, shmat, shmctl, shmdt
    64, 65, 66, 220,  # semget, semop, semctl, semtimedop
    68, 69, 70, 71,  # msgget, msgsnd, msgrcv, msgctl
)
CLONE_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET


@functools.lru_cache(maxsize=None)
def seccomp_program() -> bytes | None:
    """A classic-BPF seccomp filter (x86_64; None elsewhere): the syscalls above fail with EPERM, clone with a
    namespace flag fails with EPERM, clone3 with ENOSYS (its flags cannot be inspected; libc falls back to
    clone), x32 and foreign-arch syscalls with ENOSYS; everything else is allowed."""
    import platform
    import struct

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    deny = list(dict.fromkeys(DENY_X86_64))
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
        (jset, 0, 1, CLONE_NAMESPACE_FLAGS),
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
        (ret, 0, 0, enosys),
    ]
    assert prog[i_allow] == (ret, 0, 0, allow) and prog[i_clone] == (ld, 0, 0, 16)
    assert prog[i_eperm] == (ret, 0, 0, eperm) and prog[i_enosys] == (ret, 0, 0, enosys) == prog[-1]
    assert max(p[1] for p in prog) < 256  # (the clone check's "ret eperm" doubles as the deny list's target)
    return b"".join(struct.pack("<HBBI", *p) for p in prog)


def seccomp_pipe(program: bytes) -> int:
    """A pipe's read end holding `program` (passed with `pass_fds`, which keeps its number in the child)."""
    r, w = os.pipe()
    try:
        os.write(w, program)  # ~0.5 KB: fits the pipe buffer
    finally:
        os.close(w)
    return r


def with_fd(command: list[str], fd: int) -> list[str]:
    """`command` with the `SECCOMP_FD` placeholder replaced by `fd`."""
    return [str(fd) if arg == SECCOMP_FD else arg for arg in command]
