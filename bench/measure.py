"""Trampoline that runs one command and reports its wall time, peak RSS and CPU.

``python -m bench.measure RESULT_JSON -- CMD...`` runs CMD (stdio inherited),
reaps it with ``os.wait4`` and writes ``{"returncode", "wall_s",
"peak_rss_bytes", "cpu_s", "machine_busy_s"}`` to RESULT_JSON, then exits 0 if
CMD succeeded, else 1.

Why a trampoline: Linux folds the high-water RSS of the address space a child
had *before* exec into the child's ``ru_maxrss``; spawned straight from the
benchmark (which holds torch and reference tensors) every contender would
inherit the benchmark's peak. This process imports only the standard library,
so the floor it adds is a bare interpreter (~10 MB).

``machine_busy_s`` is the busy CPU time of the whole machine over the run (from
``/proc/stat``); minus the child's own ``cpu_s`` it tells how much else ran
meanwhile (other processes, and kernel threads such as page writeback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

IDLE_FIELDS = (3, 4)  # idle, iowait in the "cpu" line of /proc/stat


def machine_busy_s() -> float:
    """Busy CPU seconds of all CPUs since boot (0.0 where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    busy = sum(v for i, v in enumerate(fields) if i not in IDLE_FIELDS)
    return busy / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m bench.measure RESULT_JSON -- CMD...", file=sys.stderr)
        return 2
    result_path, cmd = argv[0], argv[2:]
    busy0 = machine_busy_s()
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd)
    except OSError as exc:
        print(f"cannot start {cmd[0]}: {exc}", file=sys.stderr)
        code, rss, cpu = 127, 0, 0.0
    else:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
        rss = usage.ru_maxrss * 1024  # KiB on Linux
        cpu = usage.ru_utime + usage.ru_stime
    wall = time.perf_counter() - start
    result = {
        "returncode": code,
        "wall_s": wall,
        "peak_rss_bytes": rss,
        "cpu_s": cpu,
        "machine_busy_s": machine_busy_s() - busy0,
    }
    with open(result_path, "w") as fh:
        json.dump(result, fh)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
