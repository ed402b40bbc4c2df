"""The Markdown report: machine, software, data set, one table per protocol and round with the
mailsyncd/tool ratios, mailsyncd's own details, and the no-op scaling across sizes."""

from __future__ import annotations

import math
import platform
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import measure
from mailsyncd_noop import CYCLES
from measure import Cell, RunInfo, SizeResults
from tools import ALL_TOOLS, Tool, first_line

IMAP_ROWS = ("mailsyncd", "mbsync", "offlineimap", "getmail6", "raw-imap", "cp")
POP3_ROWS = ("mailsyncd-pop3", "fetchmail", "mpop", "raw-pop3")
MIN_CPU = 0.05  # below this, GNU time's 10 ms steps make a ratio meaningless
ROUND_TITLES = {"initial": "initial full sync", "noop": "no-op resync (nothing changed)",
                "incremental": "incremental sync after the round 3 changes"}
SHORT_TITLES = {"initial": "initial", "noop": "no-op", "incremental": "incremental"}
LOWER_BOUND_LABEL = {"raw-imap": "lower bound: raw IMAP stream", "raw-pop3": "lower bound: raw POP3 stream",
                     "cp": "lower bound: `cp -r` of the server Maildir"}


def seconds(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def environment(workdir: Path, chosen: Iterable[Tool]) -> dict[str, str]:
    info = measure.machine()
    info["filesystem (workdir)"] = measure.filesystem(workdir)
    info["Python"] = platform.python_version()
    info["Dovecot"] = first_line(["dovecot", "--version"])
    info.update({f"tool: {tool.name}": tool.version() for tool in chosen})
    return info


def paired_ratio(reference: Cell, other: Cell, attribute: str) -> float:
    """Median over repetitions of mailsyncd(i)/tool(i): pairs measured minutes apart, same load."""
    if not reference.samples or not other.samples:
        return float("nan")
    ratios = []
    base_passed, other_passed = reference.passed(), other.passed()
    for index, sample in enumerate(other.samples):
        pick = min(index, len(reference.samples) - 1)
        base = reference.samples[pick]
        if not (base_passed[pick] and other_passed[index]) or getattr(sample, attribute) <= 0:
            continue
        if attribute == "cpu" and sample.cpu < MIN_CPU:
            continue
        ratios.append(getattr(base, attribute) / getattr(sample, attribute))
    return statistics.median(ratios) if ratios else float("nan")


def _ratio_text(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _checks_text(cell: Cell) -> str:
    """Each distinct outcome once, with how many runs had it when they differ."""
    outcomes = Counter(f"{s.error} -> {c}" if s.error else c for s, c in zip(cell.samples, cell.checks, strict=False))
    outcomes.update(cell.checks[len(cell.samples):])  # "not run" entries have no sample
    if len(outcomes) == 1:
        return next(iter(outcomes))
    return "<br>".join(f"{count}x: {text}" for text, count in outcomes.most_common()) or "-"


def _trips_text(cell: Cell) -> str:
    trips = cell.trips()
    return "-" if trips is None else f"{trips[0]:g} ({trips[1]:g})"


def round_table(results: SizeResults, rows: Sequence[str], round_name: str, reference: str) -> str:
    cells = {name: results.cells[(name, round_name)] for name in rows if (name, round_name) in results.cells}
    counted = any(cell.trips() is not None for cell in cells.values())
    trips_head, trips_rule = (" round trips (connections) |", "---|") if counted else ("", "")
    lines = ["| tool | runs | wall s | CPU s (user+sys) | peak RSS MiB | msg/s | server CPU s |"
             f"{trips_head} check | {reference}/tool wall | {reference}/tool CPU |",
             f"|---|---|---|---|---|---|---|{trips_rule}---|---|---|"]
    base = results.cells.get((reference, round_name), Cell())
    for name, cell in cells.items():
        label = LOWER_BOUND_LABEL.get(name, name)
        trips = f" {_trips_text(cell)} |" if counted else ""
        if not cell.samples:
            lines.append(f"| {label} | 0 | - | - | - | - | - |{trips} {_checks_text(cell)} | - | - |")
            continue
        wall = cell.wall()
        passed = cell.passed()
        rate = f"{cell.moved / wall:.0f}" if cell.moved and wall > 0 and any(passed) else "-"
        rss = f"{cell.rss_mib():.0f}" if name != "cp" or cell.rss_mib() else "-"
        if name == reference:
            ratio_wall = ratio_cpu = "1 (ref)"
        else:
            ratio_wall = _ratio_text(paired_ratio(base, cell, "wall"))
            ratio_cpu = _ratio_text(paired_ratio(base, cell, "cpu"))
        server = seconds(cell.server_cpu()) if name != "cp" else "-"
        runs = str(len(cell.samples))
        if passed.count(False):
            runs += " (all failed)" if not any(passed) else f" ({passed.count(False)} failed)"
        lines.append(f"| {label} | {runs} | {seconds(wall)} | {seconds(cell.cpu())} | {rss} | {rate} | "
                     f"{server} |{trips} {_checks_text(cell)} | {ratio_wall} | {ratio_cpu} |")
    return "\n".join(lines)


def _protocol_sections(results: SizeResults, protocol: str, rows: Sequence[str], reference: str) -> list[str]:
    out = []
    for round_name in measure.ROUNDS:
        if not any((name, round_name) in results.cells for name in rows):
            continue
        out += [f"### {protocol}: {ROUND_TITLES[round_name]}", "",
                round_table(results, rows, round_name, reference), ""]
    return out


def _sources_row(results: SizeResults) -> list[str]:
    """Which mailsyncd code each run used: others may commit while a long run goes on."""
    if not results.mailsyncd_sources:
        return []
    digests = {entry.rsplit(": ", 1)[1] for entry in results.mailsyncd_sources}
    warning = " **changed during the run**: " + ", ".join(results.mailsyncd_sources) if len(digests) > 1 else ""
    return [f"| mailsyncd source (sha256 of mailsyncd/**/*.py) | {', '.join(sorted(digests))}{warning} |"]


def _summary(results: SizeResults) -> list[str]:
    """One line per protocol and round: the wall-time ratio against every tool and lower bound."""
    out = ["## Summary: mailsyncd/tool wall time (median of paired ratios; > 1 means mailsyncd is slower)", "",
           "| round | " + " | ".join(IMAP_ROWS[1:] + POP3_ROWS[1:]) + " |",
           "|---" * (len(IMAP_ROWS) + len(POP3_ROWS) - 1) + "|"]
    for round_name in measure.ROUNDS:
        values = []
        for reference, rows in (("mailsyncd", IMAP_ROWS), ("mailsyncd-pop3", POP3_ROWS)):
            base = results.cells.get((reference, round_name), Cell())
            for name in rows[1:]:
                cell = results.cells.get((name, round_name))
                values.append(_ratio_text(paired_ratio(base, cell, "wall")) if cell else "")
        out.append(f"| {SHORT_TITLES[round_name]} | " + " | ".join(values) + " |")
    return [*out, "", "IMAP columns compare with `mailsyncd`, POP3 columns (fetchmail, mpop, raw-pop3) with "
            "`mailsyncd-pop3`.", ""]


def _mailsyncd_details(results: SizeResults) -> list[str]:
    if not results.inprocess:
        return []
    keys = ("import", "open", "sync", "open_and_sync")
    medians = {key: statistics.median(run[key] for run in results.inprocess) for key in keys}
    cli = results.cells.get(("mailsyncd", "noop"), Cell())
    mbsync = results.cells.get(("mbsync", "noop"), Cell())
    return [
        "## mailsyncd no-op, inside the process", "",
        f"No-op pass measured inside the process (median of {len(results.inprocess)}), next to whole runs:", "",
        "| what | seconds |", "|---|---|",
        f"| import mailsyncd (interpreter already running) | {seconds(medians['import'])} |",
        f"| `App.open` (state database, schema check) | {seconds(medians['open'])} |",
        f"| `sync_account` (connect, login, LIST, per-folder STATUS/CONDSTORE check) | "
        f"{seconds(medians['sync'])} |",
        f"| `App.open` + `sync_account` | {seconds(medians['open_and_sync'])} |",
        f"| whole `mailsyncd sync` process (interpreter start-up included) | {seconds(cli.wall())} |",
        f"| whole `mbsync -a` process | {seconds(mbsync.wall())} |", "",
        *_daemon_cycle(results.inprocess, mbsync),
    ]


def _daemon_cycle(inprocess: Sequence[dict[str, float]], mbsync: Cell) -> list[str]:
    """The daemon's no-op cycle on its kept connection beside mbsync's whole no-op run."""
    runs = [run for run in inprocess if "cycle_wall" in run]  # reports saved before it was measured lack it
    if not runs:
        return []
    wall, cpu, trips, first, login_trips = (
        statistics.median(run[key] for run in runs)
        for key in ("cycle_wall", "cycle_cpu", "cycle_round_trips", "keep_first", "sync_round_trips"))
    mbsync_trips = mbsync.trips()
    mbsync_trips_text = "-" if mbsync_trips is None else f"{mbsync_trips[0]:g} ({mbsync_trips[1]:g} connection)"
    ratio = wall / mbsync.wall() if mbsync.samples and mbsync.wall() > 0 else float("nan")
    cpu_ratio = cpu / mbsync.cpu() if mbsync.samples and mbsync.cpu() >= MIN_CPU else float("nan")
    return [
        "The daemon's no-op cycle: on the same `App`, one `sync_account(keep=True)` pass logs in and keeps "
        f"its session ({seconds(first)} s), then each further pass runs on the kept connection, with no "
        f"process start, TLS handshake or login: the median of {CYCLES} such cycles "
        f"(median over {len(runs)} run{'s' if len(runs) > 1 else ''}). mailsyncd's round trips are its own count "
        "after login (\"N round trips to\" on `mailsyncd.app`; the non-kept pass above made "
        f"{login_trips:g}); mbsync's are " + ("the proxy's count of its whole run, TLS handshake and login included."
                                              if mbsync_trips else "counted with `--rtt` or `--count-trips` only."),
        "",
        "| what | wall s | CPU s | round trips |", "|---|---|---|---|",
        f"| **daemon no-op cycle** (`sync_account(keep=True)` on the kept connection) | {seconds(wall)} | "
        f"{seconds(cpu)} | {trips:g} |",
        f"| whole `mbsync -a` no-op process | {seconds(mbsync.wall())} | {seconds(mbsync.cpu())} | "
        f"{mbsync_trips_text} |",
        f"| daemon cycle / mbsync (ratio of medians) | {_ratio_text(ratio)} | {_ratio_text(cpu_ratio)} | |", "",
    ]


def _state_table(results: SizeResults) -> list[str]:
    if not results.state_bytes:
        return []
    out = ["## State kept by each tool", "",
           "| tool | bytes after initial | bytes per message | bytes after incremental |", "|---|---|---|---|"]
    for name, pairs in results.state_bytes.items():
        first, last = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        per = first / results.count if results.count else 0
        out.append(f"| {name} | {first:,.0f} | {per:.0f} | {last:,.0f} |")
    out += ["", "mailsyncd: the SQLite file plus its WAL. Other tools: everything in their state directory "
            "(mbsync SyncState files, offlineimap metadata, getmail oldmail files, fetchmail .fetchids, "
            "mpop UIDL file).", ""]
    return out


def _audit_table(results: SizeResults) -> list[str]:
    if not results.fsync_audit:
        return []
    out = ["## fsync audit (initial sync once more under `strace -f -c`, not timed)", "",
           "| tool | fsync | fdatasync | syncfs | other (sync, sync_file_range, msync) | messages stored "
           "| calls per message |", "|---|---|---|---|---|---|---|"]
    for name, counts in results.fsync_audit.items():
        calls = {key: value for key, value in counts.items() if not key.startswith("_")}
        named = [calls.get(call, 0) for call in ("fsync", "fdatasync", "syncfs")]
        stored = counts.get("_messages", 0)
        per = f"{sum(calls.values()) / stored:.2f}" if stored else "-"
        stopped = "" if counts.get("_complete", 1) else " (stopped after 10 min)"
        out.append(f"| {name} | {' | '.join(map(str, named))} | {sum(calls.values()) - sum(named)} | "
                   f"{stored}{stopped} | {per} |")
    return [*out, ""]


def _scaling(done: Sequence[SizeResults]) -> list[str]:
    if len(done) < 2:
        return []
    header = " | ".join(f"{r.count}x{r.folders}" for r in done)
    out = ["## No-op resync against N (all sizes of this invocation)", "",
           f"| tool | {header} |", "|---" * (len(done) + 1) + "|"]
    names = dict.fromkeys(name for r in done for (name, round_name) in r.cells if round_name == "noop")
    for name in names:
        values = " | ".join(seconds(r.cells.get((name, "noop"), Cell()).wall()) for r in done)
        out.append(f"| {name} (whole run, s) | {values} |")
    for key, label in (("sync", "mailsyncd `sync_account` in process (s)"),
                       ("cycle_wall", "mailsyncd daemon no-op cycle, kept connection (s)")):
        if all(r.inprocess and all(key in x for x in r.inprocess) for r in done):
            values = " | ".join(seconds(statistics.median(x[key] for x in r.inprocess)) for r in done)
            out.append(f"| {label} | {values} |")
    return [*out, ""]


TRIPS_NOTE = (
    "*round trips (connections)*: counted in bench/latency.py, outside the tools and the same way for all: "
    "on each connection, a turn is the server sending after the client sent something since the server last "
    "did (an answer the client may have waited for), summed over the run's connections; *connections* is how "
    "many the run opened (each one a login). A TLS 1.3 connection costs two turns before its first command "
    "(handshake, then the greeting); TCP's handshake is not counted. Medians over the runs that passed.")


def _network_line(run: RunInfo) -> str:
    if run.rtt:
        return f"- added round-trip time: {run.rtt:g} ms (bench/latency.py between every tool and the server)"
    if run.count_trips:
        return ("- network: loopback through bench/latency.py with no added delay, to count round trips "
                "(`--count-trips`); walls include the proxy's forwarding: compare them with a run without it")
    return "- network: loopback, no added latency"


def render(results: SizeResults, done: Sequence[SizeResults], run: RunInfo) -> str:
    once = f"; run once only: {', '.join(sorted(run.once))}" if run.once else ""
    lines = [
        f"# mailsyncd benchmark: {results.count} messages in {results.folders} folders", "",
        f"- started {results.started}, finished {results.finished}",
        f"- command: `{run.command}`",
        _network_line(run),
        f"- every figure is the **median** of {run.repeat} repetitions{once}; ratios are medians of "
        "mailsyncd/tool computed pair by pair within each repetition (> 1: mailsyncd is slower)",
        f"- load average at start / end: {' / '.join(results.load)} (2-core machine shared with other "
        "jobs: medians, not means, for that reason)", "",
        *(["## Notes", "", *(f"- {note}" for note in results.notes), ""] if results.notes else []),
        "## Machine and software", "", "| | |", "|---|---|",
        *(f"| {key} | {value} |" for key, value in run.environment.items()),
        *_sources_row(results),
        "| server | private Dovecot on 127.0.0.1 (mailsyncd.testing), implicit TLS with a throwaway CA, "
        "`mail_fsync = never`, Maildir LAYOUT=fs, CONDSTORE/QRESYNC available |", "",
        "## Data set", "", *(f"- {key}: {value}" for key, value in results.dataset.items()), "",
        "## Results", "",
        "Wall time is measured around the whole command; CPU (user+sys) and peak RSS come from "
        "`/usr/bin/time -f '%e %U %S %M'` and cover the tool's own processes (children included), "
        "not Dovecot's: *server CPU* is what Dovecot (all its processes) used during the run. CPU ratios are "
        "left out (-) where the tool used under 50 ms, as GNU time counts in 10 ms steps. "
        "Medians and ratios use the runs that passed (exit status and check); *runs* says how many did not. "
        "msg/s = messages the round had to transfer / wall time. *check*: every server "
        "message present exactly once, byte-equal after CRLF->LF, in one local folder per server folder, "
        "flags equal for tools that sync flags (mailsyncd, mbsync, offlineimap).", "",
        *([TRIPS_NOTE, ""] if run.count_trips else []),
        *_summary(results),
        *_protocol_sections(results, "IMAP", IMAP_ROWS, "mailsyncd"),
        *_protocol_sections(results, "POP3", POP3_ROWS, "mailsyncd-pop3"),
        *_mailsyncd_details(results), *_state_table(results), *_audit_table(results), *_scaling(done),
        "## Tool configuration", "", "| tool | settings | fsync |", "|---|---|---|",
    ]
    lines += [f"| {t.name} | {t.settings} | {t.fsync} |" for t in ALL_TOOLS.values() if t.name in run.tools]
    lines += ["", f"See {Path('bench/README.md')} for how the benchmark works and the fairness notes.", ""]
    return "\n".join(lines)
