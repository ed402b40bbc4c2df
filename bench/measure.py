"""Measuring one command (wall, CPU, peak RSS through GNU time), the records the report is made
from, and the description of the machine."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIME = "/usr/bin/time"
ROUNDS = ("initial", "noop", "incremental")


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds, perf_counter around the command (GNU time's %e has 10 ms steps)
    user: float
    system: float
    rss_kib: int  # peak RSS of the largest process in the tree (GNU time %M)
    exit_code: int
    error: str = ""  # empty when the exit code is one the tool documents as success
    server_cpu: float = float("nan")  # Dovecot's CPU seconds during the run (all its processes)
    round_trips: int | None = None  # turns counted by bench/latency.py over the run's connections
    connections: int | None = None  # connections made through bench/latency.py (logins)

    @property
    def cpu(self) -> float:
        return self.user + self.system


SETTLE = 1.5  # seconds of rest before each run; see measure()


def measure(argv: Sequence[str], env: dict[str, str], cwd: Path, log: Path, timeout: float,
            success: frozenset[int] = frozenset({0})) -> Sample:
    """Run argv under ``/usr/bin/time -f '%e %U %S %M'``; output goes to ``log``.

    sync(2) first: on ext4 (data=ordered) a tool's first fsync would otherwise also write back
    whatever the benchmark itself left dirty (a restored server snapshot, a previous tool's store).
    Then a short rest: real syncs are minutes apart, and mbsync sleeps a whole second when its
    Maildir changed within the current second (its guard against mtime races), which back-to-back
    rounds would otherwise charge to it.
    """
    os.sync()
    time.sleep(SETTLE)
    times = log.with_suffix(".time")
    command = [TIME, "-f", "%e %U %S %M", "-o", str(times), "--", *argv]
    started = time.perf_counter()
    with open(log, "wb") as out:
        try:
            done = subprocess.run(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
            exit_code = done.returncode
        except subprocess.TimeoutExpired:
            exit_code = -1
    wall = time.perf_counter() - started
    fields = times.read_text().split() if times.exists() else []
    numbers = fields[-4:] if len(fields) >= 4 else ["0", "0", "0", "0"]
    error = ""
    if exit_code not in success:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        error = ("timeout" if exit_code == -1 else f"exit {exit_code}") + (f": {tail[-1][:160]}" if tail else "")
    return Sample(wall, float(numbers[1]), float(numbers[2]), int(numbers[3]), exit_code, error)


def process_group_cpu(pgid: int) -> float:
    """CPU seconds of a process group: live members plus the children its leader has reaped.

    Dovecot's master forks every service (login, imap, pop3, auth) and reaps them, so the
    master's cutime/cstime plus the live processes' own times is all the server ever used.
    """
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process just ended
        if int(fields[2]) == pgid:  # fields[0] is stat field 3 (state); pgrp is field 5
            ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Cell:
    """One tool in one round, over all repetitions."""

    samples: list[Sample] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    moved: int = 0  # messages the round had to transfer

    def passed(self) -> list[bool]:
        """Per run: exited as the tool documents success, and the store passed the check."""
        return [not sample.error and not check.startswith("FAIL")
                for sample, check in zip(self.samples, self.checks, strict=False)]

    def good(self) -> list[Sample]:
        """The runs that passed; all runs if none did (the report says so)."""
        return [s for s, ok in zip(self.samples, self.passed(), strict=False) if ok] or self.samples

    def wall(self) -> float:
        return median([s.wall for s in self.good()])

    def cpu(self) -> float:
        return median([s.cpu for s in self.good()])

    def server_cpu(self) -> float:
        return median([s.server_cpu for s in self.good()])

    def rss_mib(self) -> float:
        return median([s.rss_kib / 1024 for s in self.good()])

    def trips(self) -> tuple[float, float] | None:
        """Median round trips and connections, or None when they were not counted."""
        counted = [s for s in self.good() if s.round_trips is not None and s.connections is not None]
        if not counted:
            return None
        return median([s.round_trips or 0 for s in counted]), median([s.connections or 0 for s in counted])

    def failed(self) -> list[str]:
        return sorted({s.error for s in self.samples if s.error})


@dataclass
class SizeResults:
    count: int
    folders: int
    started: str = ""
    finished: str = ""
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    inprocess: list[dict[str, float]] = field(default_factory=list)  # mailsyncd no-op, per repetition
    state_bytes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # after initial, incremental
    fsync_audit: dict[str, dict[str, int]] = field(default_factory=dict)
    dataset: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load: list[str] = field(default_factory=list)
    mailsyncd_sources: list[str] = field(default_factory=list)  # source digest at each mailsyncd run

    def cell(self, tool: str, round_name: str) -> Cell:
        return self.cells.setdefault((tool, round_name), Cell())

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["cells"] = [{"tool": tool, "round": round_name, **dataclasses.asdict(cell)}
                         for (tool, round_name), cell in self.cells.items()]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SizeResults:
        cells = {(c["tool"], c["round"]): Cell([Sample(**s) for s in c["samples"]], c["checks"], c["moved"])
                 for c in data.pop("cells")}
        data["state_bytes"] = {k: [tuple(p) for p in v] for k, v in data["state_bytes"].items()}
        return cls(**data, cells=cells)


@dataclass
class RunInfo:
    """What a report needs to know about the invocation."""

    command: str
    repeat: int
    once: list[str]
    tools: list[str]
    environment: dict[str, str]
    rtt: float = 0.0  # ms added between tool and server (bench/latency.py)
    count_trips: bool = False  # tools went through bench/latency.py, which counted round trips


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    release = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', Path("/etc/os-release").read_text(), re.MULTILINE))
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    virt = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True, check=False).stdout.strip() \
        if shutil.which("systemd-detect-virt") else "?"
    hypervisor = re.search(r"^flags\s*:.*\bhypervisor\b", cpuinfo, re.MULTILINE) is not None
    return {
        "CPU": model.group(1).strip() if model else platform.processor() or "?",
        "virtualization": f"{virt or 'none detected'}" + (" (the CPU reports a hypervisor)" if hypervisor else ""),
        "cores": str(os.cpu_count()),
        "RAM": f"{int(meminfo.group(1)) / 1024 / 1024:.1f} GiB" if meminfo else "?",
        "kernel": f"{platform.system()} {platform.release()}",
        "OS": f"{release.get('PRETTY_NAME', '?')} (debian_version {debian})",
    }


def filesystem(path: Path) -> str:
    done = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", str(path)],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or "?"


def strace_counts(path: Path) -> dict[str, int]:
    """Calls per syscall from an ``strace -c`` summary."""
    counts: dict[str, int] = {}
    pattern = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")
    for line in path.read_text().splitlines():
        match = pattern.match(line)
        if match and match.group(2) != "total":
            counts[match.group(2)] = int(match.group(1))
    return counts
