# flake8: noqa  (a compact script passed with -c; builtin imports on one line, as it was when kept as a string)
"""The bootstrap: the first Python code of every sandboxed call (run with ``python -I -S -u -c SOURCE``).

Not imported: `trl_appo.tools.sandbox.bootstrap_source()` reads this file's text in the trainer and passes it on
the command line, so the sandbox needs no view of the project and its code can never tamper with it. The
configuration (limits, user, seccomp program, cells) arrives marshalled on stdin. It imports builtin modules
only (fast start; ``ctypes`` only where a syscall Python 3.11 lacks is needed). At the bubblewrap level it is
the init of the call's PID namespace and runs the user's code as its child (see `trl_appo.tools.python`).
"""
if __name__ != "__main__":
    raise ImportError("trl_appo.tools.sandbox.bootstrap runs only as a sandbox's first code, not as an import")
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
