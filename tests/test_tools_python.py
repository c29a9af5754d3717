"""PythonTool: notebook-style output, sessions, and containment of hostile code (the machine stays unharmed)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from trl_appo.tools import PythonTool, ToolCall, ToolRegistry

IS_ROOT = os.geteuid() == 0
SANDBOX_UID = 65534


@pytest.fixture(scope="module")
def py():
    return PythonTool(timeout=5.0, max_processes=32, max_output_chars=2000)


def test_final_expression_is_printed(py):
    assert py.run("x = 6\nx * 7").text == "42"
    assert py.run("print('a')\nNone").text == "a"  # None is not printed
    assert py.run("import math\nmath.factorial(5)").text == "120"


def test_errors_show_a_clean_traceback(py):
    r = py.run("def f():\n    return 1 / 0\nf()")
    assert r.failed and r.returncode == 1
    assert 'File "<cell>", line 2, in f' in r.text and r.text.endswith("ZeroDivisionError: division by zero")
    assert "_BOOTSTRAP" not in r.text and "exec(" not in r.text
    assert "SyntaxError" in py.run("def f(:").text


def test_stateless_by_default_and_persistent_sessions_replay():
    stateless = PythonTool(timeout=5.0)
    registry = ToolRegistry([stateless])
    registry.execute(ToolCall("python", {"code": "x = 1"}), session="s")
    assert "NameError" in registry.execute(ToolCall("python", {"code": "x"}), session="s").content

    session = PythonTool(timeout=5.0, persistent=True)
    registry = ToolRegistry([session])
    assert registry.execute(ToolCall("python", "x = 20\nprint('set')"), session="a").content == "set"
    registry.execute(ToolCall("python", "1 / 0"), session="a")  # failed cells are not replayed
    assert registry.execute(ToolCall("python", "x + 22"), session="a").content == "42"  # replay is silent
    assert "NameError" in registry.execute(ToolCall("python", "x"), session="b").content  # other rollout
    registry.prime("c", [ToolCall("python", "y = 5")])  # a branch inherits its prefix's cells
    assert registry.execute(ToolCall("python", "y * 2"), session="c").content == "10"
    registry.close_session("a")
    assert "NameError" in registry.execute(ToolCall("python", "x"), session="a").content


def test_empty_code_is_an_error_the_model_sees(py):
    result = ToolRegistry([py]).execute(ToolCall("python", {"code": "  \n"}))
    assert result.failed and result.content == "Error: empty code: nothing to run."


@pytest.mark.skipif(not IS_ROOT, reason="privilege drop needs root")
def test_runs_unprivileged_in_a_throwaway_directory(py):
    out = py.run("import os\nprint(os.getuid(), os.getgid(), os.getgroups())\nprint(os.getcwd() == "
                 "os.environ['HOME'] == '/sandbox', os.environ['TMPDIR'] == '/tmp')\nopen('f.txt', 'w').write('ok')\n"
                 "open('f.txt').read()")
    assert out.text.splitlines() == [f"{SANDBOX_UID} {SANDBOX_UID} []", "True True", "'ok'"]


@pytest.mark.parametrize("path", ["/appo_sandbox_escape", "/root/appo_sandbox_escape", os.path.abspath(__file__)])
def test_writing_outside_its_directory_fails(py, path):
    before = open(path).read() if os.path.exists(path) else None
    r = py.run(f"open({path!r}, 'a').write('x')")
    assert r.failed and ("PermissionError" in r.text or "FileNotFoundError" in r.text or "Read-only" in r.text)
    assert (open(path).read() if os.path.exists(path) else None) == before
    assert not os.path.exists("/appo_sandbox_escape") and not os.path.exists("/root/appo_sandbox_escape")


def test_network_is_unreachable(py):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        r = py.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
    finally:
        server.close()
    assert r.failed and "connected" not in r.text and "Error" in r.text


def test_memory_limit(py):
    r = py.run("x = bytearray(10 * 1024**3)\nprint('allocated')")
    assert r.failed and "MemoryError" in r.text and "allocated" not in r.text


def test_sleep_forever_is_killed_at_the_wall_timeout():
    r = PythonTool(timeout=1.0).run("import time\ntime.sleep(10**6)")
    assert r.timed_out and r.failed and "exceeded the 1 s time limit" in r.text


def test_output_flood_is_read_incrementally_and_killed(py):
    r = py.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert r.flooded and r.failed
    assert len(r.text) < 2500 and "output truncated" in r.text and "output exceeded" in r.text


def test_file_size_limit():
    r = PythonTool(timeout=5.0, max_file_size_mb=1).run("open('big', 'wb').write(b'x' * (2 << 20))")
    assert r.failed and "File too large" in r.text


def _sandbox_processes() -> list[str]:
    """Live (non-zombie) processes of the sandbox user."""
    out = subprocess.run(["ps", "-u", str(SANDBOX_UID), "-o", "stat=,pid=,cmd="], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip() and not line.strip().startswith("Z")]


def _wait_for_no_sandbox_processes(deadline_s: float = 5.0) -> list[str]:
    deadline = time.monotonic() + deadline_s
    while (left := _sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.skipif(not IS_ROOT, reason="RLIMIT_NPROC only binds an unprivileged user; needs root to drop to it")
def test_fork_bomb_is_contained():
    bomb = PythonTool(timeout=1.5, max_processes=32)
    r = bomb.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert r.failed and r.timed_out
    assert _wait_for_no_sandbox_processes() == []
    assert bomb.run("print('still alive')").text == "still alive"  # the machine can still spawn processes


@pytest.mark.skipif(not IS_ROOT, reason="PID namespace needs root")
def test_background_processes_die_with_the_call(py):
    code = (
        "import os, subprocess\n"
        "if os.fork() == 0:\n"
        "    os.setsid()  # escapes the process group, not the PID namespace\n"
        "    subprocess.Popen(['sleep', '300'])\n"
        "    os._exit(0)\n"
        "print('parent done')"
    )
    assert py.run(code).text == "parent done"
    assert _wait_for_no_sandbox_processes() == []


# -- isolation levels -------------------------------------------------------------------------------------------


def test_strong_isolation_is_the_default_and_is_reported(py):
    from trl_appo.tools import describe_isolation

    assert py.isolation == "bubblewrap"
    line = describe_isolation(ToolRegistry([py]))
    assert line.startswith("python: isolation=bubblewrap") and "per-call limits" in line


def test_refuses_to_run_model_code_without_bubblewrap():
    from trl_appo.tools import SandboxUnavailable

    with pytest.raises(SandboxUnavailable, match=r"install bubblewrap.*isolation='none'"):
        PythonTool(bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="install bubblewrap"):
        PythonTool(isolation="bubblewrap", bwrap="/nonexistent/bwrap")
    with pytest.raises(ValueError, match="isolation must be"):
        PythonTool(isolation="weak")


def test_the_weak_level_is_opt_in_and_named(monkeypatch):
    weak = PythonTool(timeout=5.0, isolation="none")
    assert weak.isolation == "none" and "WEAK" in weak.describe_isolation()
    assert weak.run("print(6 * 7)").text == "42"
    monkeypatch.setenv("APPO_PYTHON_ISOLATION", "none")
    assert PythonTool(timeout=5.0, bwrap="/nonexistent/bwrap").isolation == "none"


def test_the_real_interpreter_and_its_packages_are_mounted_read_only():
    """A venv whose base interpreter lives where the sandbox user cannot read (pyenv under /root) still runs
    itself, with its own packages, not a system Python without them."""
    import site
    import sys

    numpy = pytest.importorskip("numpy")
    if not any(numpy.__file__.startswith(p) for p in site.getsitepackages()):
        pytest.skip("numpy is not one of this interpreter's own packages")
    r = PythonTool(timeout=20.0).run("import sys, numpy\nprint(sys.executable)\nprint(sys.prefix)\n"
                                     "open(numpy.__file__, 'a')")
    lines = r.text.splitlines()
    assert lines[:2] == [sys.executable, sys.prefix]
    assert "Read-only file system" in r.text or "PermissionError" in r.text


def test_private_tmpfs_is_size_capped():
    r = PythonTool(timeout=10.0, tmpfs_mb=8, max_file_size_mb=64).run(
        "open('/tmp/big', 'wb').write(b'x' * (16 << 20))")
    assert r.failed and "No space left on device" in r.text


def _fake_cgroup_host(tmp_path, subtree: str, controllers: str = "cpu memory pids"):
    """A /proc/self with this process in cgroup v2 /job, and that cgroup's interface files."""
    proc, mount = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("4:memory:/v1\n0::/job\n")
    (proc / "mountinfo").write_text(f"30 20 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw\n")
    job = mount / "job"
    job.mkdir(parents=True)
    (job / "cgroup.controllers").write_text(controllers + "\n")
    (job / "cgroup.subtree_control").write_text(subtree + "\n")
    return str(proc), str(job)


def test_cgroup_memory_max_is_used_only_where_delegated(tmp_path):
    from trl_appo.tools.sandbox.cgroup import CGROUP_ENV, find_parent

    proc, job = _fake_cgroup_host(tmp_path / "a", subtree="")
    found = find_parent(proc, environ={})
    assert found.path is None and "not enabled for the child cgroups" in found.reason
    proc, job = _fake_cgroup_host(tmp_path / "b", subtree="", controllers="cpu pids")
    assert "no memory controller" in find_parent(proc, environ={}).reason
    proc, job = _fake_cgroup_host(tmp_path / "c", subtree="cpu memory")
    assert find_parent(proc, environ={}).path == job
    assert find_parent(str(tmp_path / "missing"), environ={}).path is None  # no cgroup v2 at all
    assert find_parent(str(tmp_path / "missing"), environ={CGROUP_ENV: job}).path == job  # operator-delegated


def test_each_call_gets_its_own_cgroup_with_memory_max(tmp_path, monkeypatch):
    """With a delegated parent (faked: plain files), a call's cgroup caps memory.max at memory_mb and holds the
    call's processes before its code runs; an oom_kill event there reports the call as over its memory."""
    from trl_appo.tools import python as python_module
    from trl_appo.tools.sandbox.cgroup import CallCgroup, CgroupParent

    parent = tmp_path / "delegated"
    parent.mkdir()
    made = []
    monkeypatch.setattr(python_module, "find_parent", lambda: CgroupParent(str(parent)))
    monkeypatch.setattr(CallCgroup, "close", lambda self, wait_s=2.0: made.append(self.path))
    tool = PythonTool(timeout=5.0, memory_mb=300)
    assert tool.memory_enforcement == "cgroup" and "cgroup memory.max" in tool.describe_isolation()
    assert tool.run("print(1)").text == "1"
    (call,) = made
    assert open(os.path.join(call, "memory.max")).read() == str(300 << 20)
    assert len(open(os.path.join(call, "cgroup.procs")).read()) > 0  # the bwrap process (and its init) moved in

    def oom_on_creation(self, parent, memory_bytes, _init=CallCgroup.__init__):
        _init(self, parent, memory_bytes)
        with open(os.path.join(self.path, "memory.events"), "w") as f:
            f.write("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")

    monkeypatch.setattr(CallCgroup, "__init__", oom_on_creation)
    r = tool.run("print(1)")
    assert r.memory_exceeded and "MemoryError" in r.text


def test_the_memory_enforcement_reached_is_reported():
    tool = PythonTool(timeout=5.0)
    assert tool.memory_enforcement in ("cgroup", "watchdog")
    if tool.memory_enforcement == "watchdog":
        assert tool.cgroup.reason and f"no cgroup: {tool.cgroup.reason}" in tool.describe_isolation()
