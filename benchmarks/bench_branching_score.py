"""Benchmark: ``trl_appo.core.branching_score`` (O(T) blocked scan) vs the public release's form (an explicit
T×T discount matrix per row, docs/algorithm.md §8 defect 7).

    python benchmarks/bench_branching_score.py            # B=64, T in {1024, 4096, 8192}
    python benchmarks/bench_branching_score.py --quick    # smoke run: B=4, T in {256, 512}

Each measurement runs in a fresh subprocess so that memory numbers do not leak between configurations. Peak memory
is the peak resident-set-size increase during the call (psutil, sampled every 0.2 ms by a background thread,
relative to the RSS just before the call, after the inputs exist and one warm-up call; glibc's mmap threshold is
fixed at 64 KiB so freed buffers leave the RSS); tracemalloc cannot see torch's allocations.
The T×T matrix size is also given analytically (T²·4 bytes per row in float32).

The baseline at T=8192 costs ~64 × 256 MiB if batched, so it is run row by row (as the release does) on
``--baseline-rows`` rows (default: all rows for T ≤ 4096, 4 rows for T=8192) and its time is extrapolated linearly
to B rows (every row costs the same). Its memory is the peak of one row's matrix, i.e. what the row-by-row loop
needs; a batched version would need B times that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _inputs(B: int, T: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    entropy = torch.rand(B, T, generator=gen) * 3
    logp_ref = -torch.rand(B, T, generator=gen) * 2
    logp_cur = logp_ref + 0.01 * torch.randn(B, T, generator=gen)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[:, T // 3 : T // 3 + 50] = False  # a tool-output span
    return entropy, logp_cur, logp_ref, mask


def baseline_branching_score(entropy, logp_cur, logp_ref, mask, gamma=1.0, omega_clip=0.2, eps=1e-6):
    """The release's form: for each row, build the upper-triangular T×T matrix gamma^(k−t) and matmul."""
    import torch

    B, T = entropy.shape
    scores = torch.zeros(B, T)
    for b in range(B):
        m = mask[b].float()
        delta = (logp_cur[b] - logp_ref[b]) * m
        idx = torch.arange(T, dtype=torch.float32)
        expo = idx[None, :] - idx[:, None]  # (T, T)
        decay = torch.where(expo >= 0, torch.pow(torch.tensor(gamma), expo), torch.zeros(()))  # (T, T)
        gain = decay @ delta
        del expo, decay
        omega = gain.clamp(-20, 20).exp().clamp(1 - omega_clip, 1 + omega_clip)
        n = m.sum().clamp(min=1)

        def z(x):
            mean = (x * m).sum() / n
            std = (((x - mean) * m) ** 2).sum().div(n).sqrt()
            return (x - mean) / (std + eps) * m

        scores[b] = z(entropy[b]) * z(omega)
    return scores


class _PeakRSS:
    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _worker(cfg: dict) -> dict:
    import torch

    from trl_appo.core import branching_score

    torch.set_num_threads(cfg["threads"])
    B, T, rows, repeats, gamma = cfg["B"], cfg["T"], cfg["rows"], cfg["repeats"], cfg["gamma"]
    entropy, lc, lr, mask = _inputs(rows, T)
    if cfg["method"] == "ours":
        fn = lambda: branching_score(entropy, lc, lr, mask, gamma=gamma)  # noqa: E731
    else:
        fn = lambda: baseline_branching_score(entropy, lc, lr, mask, gamma=gamma)  # noqa: E731
    if cfg.get("check"):  # the two forms agree
        ours = branching_score(entropy, lc, lr, mask, gamma=gamma).scores
        base = baseline_branching_score(entropy, lc, lr, mask, gamma=gamma)
        cfg["max_abs_diff"] = float((ours - base).abs().max())
    fn()  # warm-up (lazy init)
    if cfg["measure"] == "memory":
        with _PeakRSS() as mem:
            fn()
        cfg["peak_rss_mib"] = mem.delta_mib
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        cfg["seconds_measured"] = min(times)  # min: the machine is shared, noise only adds time
        cfg["seconds_for_B"] = cfg["seconds_measured"] * B / rows
    cfg["torch_threads"] = torch.get_num_threads()
    return cfg


def _scan_strategies(B: int, T: int, repeats: int) -> list[dict]:
    """Why a blocked scan: compare it with a python loop over T (vector ops over B)."""
    import torch

    from trl_appo.core import discounted_suffix_sum

    x = torch.randn(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    out = []
    for gamma in (1.0, 2 ** (-1 / 64)):

        def loop():
            acc = torch.zeros(B)
            res = torch.empty(B, T)
            for t in range(T - 1, -1, -1):
                acc = acc * gamma + x[:, t]
                res[:, t] = acc
            return res

        row = {"gamma": gamma}
        for name, fn in (("blocked", lambda: discounted_suffix_sum(x, mask, gamma)), ("loop", loop)):
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            row[name] = min(ts)
        out.append(row)
    return out


def _run(cfg: dict) -> dict:
    """Time and memory in separate fresh subprocesses (the malloc setting below would slow the timed run)."""
    return {**_run1({**cfg, "measure": "time"}), **_run1({**cfg, "measure": "memory", "check": False})}


def _run1(cfg: dict) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    # A fixed glibc mmap threshold: every buffer >= 64 KiB is mmap'd and returned to the OS on free, so the RSS
    # peak of the measured call is not hidden by memory a warm-up call left in the heap.
    if cfg["measure"] == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: B=4, T in {256, 512}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--gamma", type=float, default=1.0, help="Ω discount (spec default 1.0)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both methods (1: stable numbers on a shared small machine)")
    ap.add_argument("--baseline-rows", type=int, default=None, help="rows the T×T baseline really runs")
    ap.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    B, lengths = (4, [256, 512]) if args.quick else (args.batch, args.lengths)
    import torch

    torch.set_num_threads(args.threads)
    print(f"branching_score vs T×T discount matrix — B={B}, gamma={args.gamma}, torch threads={args.threads}\n")
    header = (
        f"{'T':>6} | {'ours ms':>9} | {'ours peak MiB':>13} | {'base rows':>9} | {'base ms (B rows)':>16} | "
        f"{'base peak MiB':>13} | {'T×T MiB/row':>11} | {'speed-up':>9} | {'mem ratio':>9} | {'max |diff|':>10}"
    )
    print(header)
    print("-" * len(header))
    for T in lengths:
        rows = args.baseline_rows or (B if T <= 4096 else min(B, 4))
        ours = _run({"method": "ours", "B": B, "T": T, "rows": B, "repeats": 7, "gamma": args.gamma,
                     "threads": args.threads})
        base = _run({"method": "baseline", "B": B, "T": T, "rows": rows, "repeats": 1 if T > 2048 else 3,
                     "gamma": args.gamma, "threads": args.threads, "check": T <= 4096})
        speed = base["seconds_for_B"] / ours["seconds_for_B"]
        mem_ratio = base["peak_rss_mib"] / max(ours["peak_rss_mib"], 1e-9)
        diff = base.get("max_abs_diff")
        print(
            f"{T:>6} | {ours['seconds_for_B'] * 1e3:>9.1f} | {ours['peak_rss_mib']:>13.1f} | {rows:>9} | "
            f"{base['seconds_for_B'] * 1e3:>16.0f} | {base['peak_rss_mib']:>13.1f} | {T * T * 4 / 2**20:>11.0f} | "
            f"{speed:>8.0f}x | {mem_ratio:>8.1f}x | {'-' if diff is None else f'{diff:.1e}':>10}"
        )
    T = lengths[-1]
    print(f"\ndiscounted_suffix_sum strategies at B={B}, T={T} (min of 3, ms):")
    for row in _scan_strategies(B, T, 3):
        print(f"  gamma={row['gamma']:.5f}: blocked scan {row['blocked'] * 1e3:.1f} ms, "
              f"python loop over T {row['loop'] * 1e3:.1f} ms ({row['loop'] / row['blocked']:.0f}x)")


if __name__ == "__main__":
    main()
