"""trl_appo.runtime: held stderr (the one-line contract whatever third-party packages print) and the CPU thread
count chosen from the load."""

import os
import sys

import pytest

from trl_appo import runtime


class Bad(Exception):
    pass


def test_held_stderr_drops_everything_on_bad_input(capfd):
    with pytest.raises(Bad):
        with runtime.held_stderr(discard_on=(Bad,)):
            os.write(2, b"fd-level noise\n")
            print("python-level noise", file=sys.stderr)
            raise Bad
    print("the one line", file=sys.stderr)
    assert capfd.readouterr().err == "the one line\n"


def test_held_stderr_passes_everything_on_otherwise_in_order(capfd):
    with runtime.held_stderr(discard_on=(Bad,)):
        os.write(2, b"first\n")
        print("second", file=sys.stderr)
        os.write(2, b"third\n")
    assert capfd.readouterr().err == "first\nsecond\nthird\n"
    with pytest.raises(KeyError):  # an unexpected error: what was held is shown with it
        with runtime.held_stderr(discard_on=(Bad,)):
            os.write(2, b"context\n")
            raise KeyError("x")
    assert capfd.readouterr().err == "context\n"


def test_a_stream_grabbed_while_held_writes_to_stderr_afterwards(capfd):
    with runtime.held_stderr():
        grabbed = sys.stderr  # e.g. a logging handler created during the imports
    grabbed.write("later\n")
    grabbed.flush()
    assert capfd.readouterr().err == "later\n"


@pytest.mark.parametrize("load,cores,expected", [(0.2, 2, 2), (1.5, 2, 1), (5.0, 2, 1), (2.0, 8, 6), (0.1, 8, 8)])
def test_choose_threads_leaves_busy_cores_alone(monkeypatch, load, cores, expected):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert runtime.choose_threads() == expected


def test_set_cpu_threads_respects_the_users_choice(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        monkeypatch.setattr(runtime, "choose_threads", lambda: 2)
        n, line = runtime.set_cpu_threads()
        assert n == 1 and torch.get_num_threads() == 1 and "OMP_NUM_THREADS" in line
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        n, line = runtime.set_cpu_threads()
        assert n == 2 and torch.get_num_threads() == 2 and "load average" in line
    finally:
        torch.set_num_threads(before)
