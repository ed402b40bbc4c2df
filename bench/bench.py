"""Side-by-side benchmark: mailsyncd against mbsync, offlineimap, getmail6 (IMAP) and fetchmail,
mpop (POP3), with two lower bounds (one raw IMAP stream, ``cp -r`` of the server's Maildir).

Run it through ``bench/run`` (installs the tools); see bench/README.md for what is measured and how
the tools are configured. Per size: a private Dovecot is filled once and snapshotted; before each
tool's three rounds (initial, no-op, incremental) the snapshot is restored, so every tool sees the
same server states and the same changes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import check
import dataset
import measure
import report
import tools
from latency import LatencyProxy, self_check
from measure import RunInfo, SizeResults
from rawmail import Imap
from tools import Endpoint, Tool, Workspace

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # the server's change helpers live with the tests

from tests.server_helpers import DevServer  # noqa: E402 - after the path set-up above

LOWER_BOUNDS = ("raw-imap", "raw-pop3", "cp")
DEFAULT_TOOLS = (*tools.ALL_TOOLS, *LOWER_BOUNDS)
IMAP_USER, POP_USER = "alice", "pop"
AUDIT_TIMEOUT = 600.0  # seconds; a traced getmail6 often stalls on its SIGCHLD race (see README)


def log(text: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class ServerStates:
    """The filled server, its snapshot, and what every tool's store is checked against."""

    def __init__(self, workdir: Path, count: int, folders: int, seed: int, rtt: float = 0.0,
                 count_trips: bool = False) -> None:
        self.rtt = rtt
        self.count_trips = count_trips or rtt > 0
        self.proxy: LatencyProxy | None = None
        self.password = secrets.token_urlsafe(12)
        self.server = DevServer(workdir / "server", users=((IMAP_USER, self.password), (POP_USER, self.password)))
        self.snapshots = workdir / "snapshot"
        self.generator = dataset.Generator(seed)
        self.layouts = {IMAP_USER: dataset.layout_imap(count, folders, seed), POP_USER: dataset.layout_pop(count)}
        self.changes: dict[str, dataset.Changes] = {}
        self.seed = seed
        self.dirty: set[str] = set()
        self._expected: dict[tuple[str, ...], check.Expected] = {}
        self.ever_seen: dict[str, set[str]] = {IMAP_USER: set(), POP_USER: set()}
        self.total_bytes: dict[str, int] = {}

    def setup(self) -> None:
        self.server.start()
        for user, layout in self.layouts.items():
            started = time.monotonic()
            self.total_bytes[user] = dataset.fill(self.server, user, layout, self.generator)
            self.changes[user] = dataset.plan_changes(layout, self.seed, with_flags=user == IMAP_USER)
            log(f"filled {user}: {layout.total} messages, {self.total_bytes[user] / 1e6:.0f} MB "
                f"in {time.monotonic() - started:.1f} s")
            self.expected(user)  # the reference, and Dovecot's caches as a first client leaves them
        self.server.stop()
        self.snapshots.mkdir()
        for user in self.layouts:
            subprocess.run(["cp", "-a", str(self.home(user)), str(self.snapshots / user)], check=True)
        self.server.start()
        if self.count_trips:  # the tools' way in; the benchmark's own view of the server stays direct
            self_check(self.rtt)  # the counter behind the report's round trips counts right
            self.proxy = LatencyProxy(self.server.host, [self.server.imaps_port, self.server.pop3s_port], self.rtt)

    def home(self, user: str) -> Path:
        return self.server.maildir(user).parent

    def ensure_initial(self, user: str) -> None:
        """Put the user's mail back to the snapshot if a previous run changed it."""
        if user not in self.dirty:
            return
        self.server.stop()
        shutil.rmtree(self.home(user))
        subprocess.run(["cp", "-a", str(self.snapshots / user), str(self.home(user))], check=True)
        self.server.start()
        self.dirty.discard(user)

    def apply_changes(self, user: str) -> None:
        self.dirty.add(user)
        dataset.apply_changes(self.server, user, self.changes[user], self.generator)

    def cpu(self) -> float:
        """Dovecot's CPU seconds so far (the master leads the process group)."""
        pid_file = self.server.workdir / "run" / "master.pid"
        return measure.process_group_cpu(int(pid_file.read_text().split()[0]))

    def measure(self, argv: list[str], ws: Workspace, log_path: Path, timeout: float,
                success: frozenset[int] = frozenset({0}), env: dict[str, str] | None = None) -> measure.Sample:
        """One measured run, with the server's CPU over the same interval and, through the
        proxy, the round trips and connections of the run."""
        trips_before = self.proxy.trips() if self.proxy is not None else None
        before = self.cpu()
        sample = measure.measure(argv, env or ws.env(), ws.root, log_path, timeout, success)
        sample = dataclasses.replace(sample, server_cpu=self.cpu() - before)
        if self.proxy is None or trips_before is None:
            return sample
        trips = self.proxy.trips() - trips_before
        return dataclasses.replace(sample, round_trips=trips.turns, connections=trips.connections)

    def endpoint(self, protocol: str, ws: Workspace) -> Endpoint:
        """Where a tool connects: 'localhost' (the certificate's DNS name; some tools cannot
        check an IP address) and the CA copied into the tool's own directory."""
        user = IMAP_USER if protocol == "imap" else POP_USER
        port = self.server.imaps_port if protocol == "imap" else self.server.pop3s_port
        if self.proxy is not None:
            port = self.proxy.port(port)
        ca_file = ws.root / "ca.pem"
        shutil.copyfile(self.server.ca_file, ca_file)
        return Endpoint("localhost", port, ca_file, user, self.password)

    @contextlib.contextmanager
    def imap(self, user: str) -> Iterator[Imap]:
        with Imap(self.server.host, self.server.imaps_port, str(self.server.ca_file)) as conn:
            conn.login(user, self.password)
            yield conn

    def folders(self, user: str) -> list[str]:
        with self.imap(user) as conn:
            return conn.folders()

    def expected(self, user: str) -> check.Expected:
        """The server's messages now; fetched again only when a STATUS fingerprint changed."""
        with self.imap(user) as conn:
            names = conn.folders()
            fingerprint = (user, *(conn.status(name) for name in names))
            if fingerprint not in self._expected:
                folders = {name: {m.sha256: check.letters(m.flags) for m in conn.messages(name)} for name in names}
                self._expected[fingerprint] = check.Expected(folders)
                self.ever_seen[user] |= self._expected[fingerprint].digests()
        return self._expected[fingerprint]


class SizeRun:
    """All tools, all repetitions, for one (messages, folders) size."""

    def __init__(self, args: argparse.Namespace, count: int, folders: int, audit: bool) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix=f"run-{count}x{folders}-", dir=args.workdir))
        self.workdir.chmod(0o711)  # a tool run as nobody must reach its own directory in runs/
        self.logs = self.workdir / "logs"
        self.logs.mkdir()
        self.states = ServerStates(self.workdir, count, folders, args.seed, args.rtt, args.count_trips)
        self.results = SizeResults(count, folders)
        self.audit = audit

    def run(self) -> SizeResults:
        results = self.results
        results.started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")  # also names the report
        results.load.append(measure.load_average())
        try:
            self.states.setup()
            self._describe_dataset()
            for repetition in range(self.args.repeat):
                for name in self.args.tools:
                    if repetition and name in self.args.once:
                        continue
                    log(f"{results.count}x{results.folders} repetition {repetition + 1}/{self.args.repeat}: {name}")
                    self._run_one(name, repetition)
            if self.audit:
                self._fsync_audit()
        finally:
            if self.states.proxy is not None:
                self.states.proxy.close()
            self.states.server.stop()
        results.load.append(measure.load_average())
        results.finished = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if not self.args.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return results

    def _describe_dataset(self) -> None:
        layout = self.states.layouts[IMAP_USER]
        gen = self.states.generator
        sizes = sorted(gen.size_target(n) for n in range(layout.total))
        folder_sizes = sorted((len(v) for v in layout.numbers.values()), reverse=True)
        self.results.dataset = {
            "messages": f"{layout.total} in {len(layout.folders)} folders (largest {folder_sizes[0]}, "
                        f"smallest {folder_sizes[-1]}); the server also has the empty special-use folders "
                        "Drafts, Junk, Sent, Trash",
            "bytes": f"{self.states.total_bytes[IMAP_USER] / 1e6:.1f} MB on the wire (CRLF)",
            "message sizes": f"median {sizes[len(sizes) // 2] / 1000:.1f} KB, max {sizes[-1] / 1e6:.2f} MB, "
                             f"{sum(s > 100_000 for s in sizes)} messages over 100 KB",
            "IMAP round 3 changes": self.states.changes[IMAP_USER].summary(),
            "POP3 mailbox": f"a second user with all {layout.total} messages in INBOX",
            "POP3 round 3 changes": self.states.changes[POP_USER].summary(),
        }

    def _run_one(self, name: str, repetition: int) -> None:
        if name in LOWER_BOUNDS:
            self._lower_bound(name, repetition)
            return
        tool = tools.ALL_TOOLS[name]
        if reason := tool.missing():
            self.results.cell(name, "initial").checks.append(f"not run: {reason}")
            return
        self._three_rounds(tool, repetition)

    def _workspace(self, name: str, repetition: int) -> Workspace:
        ws = Workspace(self.workdir / "runs" / f"{name}-{repetition}")
        ws.create()
        return ws

    def _prepare(self, tool: Tool, label: str, repetition: int) -> tuple[Workspace, Endpoint, list[str]]:
        """A fresh workspace and config for a tool, against the server in its initial state."""
        ws = self._workspace(label, repetition)
        ep = self.states.endpoint(tool.protocol, ws)
        self.states.ensure_initial(ep.user)
        argv = tool.prepare(ws, ep, self.states.folders(ep.user))
        if tool.refuses_root and os.geteuid() == 0:
            subprocess.run(["chown", "-R", "nobody:nogroup", str(ws.root)], check=True)
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]
        return ws, ep, argv

    def _three_rounds(self, tool: Tool, repetition: int) -> None:
        ws, ep, argv = self._prepare(tool, tool.name, repetition)
        if isinstance(tool, tools.Mailsyncd):
            self.results.mailsyncd_sources.append(f"{tool.name}#{repetition + 1}: {tools.mailsyncd_source_digest()}")
        initial = self.states.layouts[ep.user].total
        state_after: list[int] = []
        for round_name in measure.ROUNDS:
            if round_name == "incremental":
                self.states.apply_changes(ep.user)
            log_path = self.logs / f"{tool.name}-{repetition}-{round_name}.log"
            sample = self.states.measure(argv, ws, log_path, self.args.timeout, tool.success_codes)
            cell = self.results.cell(tool.name, round_name)
            cell.samples.append(sample)
            cell.moved = {"initial": initial, "noop": 0,
                          "incremental": self.states.changes[ep.user].new_count}[round_name]
            cell.checks.append(self._check(tool, ws, ep.user))
            log(f"  {tool.name} {round_name}: {sample.wall:.2f} s wall, {sample.cpu:.2f} s CPU, "
                f"{sample.rss_kib / 1024:.0f} MiB; {sample.error or 'exit 0'}; check {cell.checks[-1]}")
            if round_name == "noop" and tool.name == "mailsyncd":
                self._inprocess_noop(ws)
            if round_name != "noop":
                state_after.append(tool.state_bytes(ws))
        self.results.state_bytes.setdefault(tool.name, []).append((state_after[0], state_after[1]))
        if not self.args.keep_workdir:
            shutil.rmtree(ws.root)

    def _check(self, tool: Tool, ws: Workspace, user: str) -> str:
        try:
            expected = self.states.expected(user)
            local = check.scan(ws.store, tool.added_headers)
            return check.compare(expected, local, self.states.ever_seen[user], tool.syncs_flags).text()
        except Exception as error:  # the table reports it; the run goes on
            return f"FAIL: check crashed: {error!r}"

    def _inprocess_noop(self, ws: Workspace) -> None:
        log_path = self.logs / "mailsyncd-inprocess.log"
        argv = [sys.executable, str(BENCH / "mailsyncd_noop.py"), str(ws.root / "config.toml")]
        done = subprocess.run(argv, env=ws.env(), cwd=ws.root, capture_output=True, text=True,
                              timeout=self.args.timeout, check=False)
        log_path.write_text(done.stdout + done.stderr)
        if done.returncode == 0:
            self.results.inprocess.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            self.results.notes.append(f"in-process no-op failed: {done.stderr.strip()[-200:]}")

    def _lower_bound(self, name: str, repetition: int) -> None:
        user = POP_USER if name == "raw-pop3" else IMAP_USER
        self.states.ensure_initial(user)
        ws = self._workspace(name, repetition)
        env = {**ws.env(), "BENCH_PASSWORD": self.states.password}
        if name == "cp":
            argv = ["cp", "-r", str(self.states.server.maildir(user)), str(ws.store / "copy")]
        else:
            ep = self.states.endpoint("imap" if name == "raw-imap" else "pop3", ws)
            argv = [sys.executable, str(BENCH / "rawmail.py"), name.removeprefix("raw-"), "--host", ep.host,
                    "--port", str(ep.port), "--cafile", str(ep.ca_file), "--user", ep.user]
        log_path = self.logs / f"{name}-{repetition}.log"
        sample = self.states.measure(argv, ws, log_path, self.args.timeout, env=env)
        cell = self.results.cell(name, "initial")
        cell.samples.append(sample)
        cell.moved = self.states.layouts[user].total
        cell.checks.append(self._lower_bound_check(name, sample, log_path, cell.moved))
        log(f"  {name}: {sample.wall:.2f} s wall, {sample.cpu:.2f} s CPU; {sample.error or 'exit 0'}")
        shutil.rmtree(ws.root)

    @staticmethod
    def _lower_bound_check(name: str, sample: measure.Sample, log_path: Path, want: int) -> str:
        if sample.error:
            return f"FAIL: {sample.error}"
        if name == "cp":
            return "n/a (copies Dovecot's files as they are)"
        got = json.loads(log_path.read_text().strip().splitlines()[-1])
        return (f"{got['messages']} messages, {got['bytes'] / 1e6:.0f} MB read" if got["messages"] == want
                else f"FAIL: {got['messages']} of {want} messages")

    def _fsync_audit(self) -> None:
        """Each tool's initial sync once more under strace -c: how many sync calls it makes."""
        if shutil.which("strace") is None:
            self.results.notes.append("fsync audit skipped: strace is not installed")
            return
        for name in self.args.tools:
            tool = tools.ALL_TOOLS.get(name)
            if tool is None or tool.missing():
                continue
            ws, _ep, argv = self._prepare(tool, f"audit-{name}", 0)
            summary = self.logs / f"strace-{name}.txt"
            traced = ["strace", "-f", "-c", "-o", str(summary),
                      "-e", "trace=fsync,fdatasync,sync_file_range,syncfs,sync,msync", *argv]
            complete = _run_group(traced, ws, AUDIT_TIMEOUT)
            delivered = sum(1 for sub in ("cur", "new") for _ in ws.store.rglob(f"{sub}/*"))
            counts = measure.strace_counts(summary) if summary.exists() else {}
            self.results.fsync_audit[name] = {**counts, "_messages": delivered, "_complete": int(complete)}
            log(f"  fsync audit {name}: {counts}, {delivered} messages{'' if complete else ' (stopped)'}")
            shutil.rmtree(ws.root)


def _run_group(argv: list[str], ws: Workspace, timeout: float) -> bool:
    """Run argv in its own process group; on timeout SIGTERM the group (strace still writes its
    summary); True if it finished in time."""
    process = subprocess.Popen(argv, env=ws.env(), cwd=ws.root, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        return False


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        count, _, folders = part.strip().lower().partition("x")
        sizes.append((int(count), int(folders or 1)))
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000x5,20000x20", type=parse_sizes,
                        help="messages x folders, comma-separated (default 2000x5,20000x20)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                        type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                        help=f"comma-separated subset of: {','.join(DEFAULT_TOOLS)}")
    parser.add_argument("--once", default="", type=lambda text: {t.strip() for t in text.split(",") if t.strip()},
                        help="tools to run in the first repetition only (very slow ones at large sizes)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="per tool run, seconds")
    parser.add_argument("--workdir", type=Path, help="where servers and stores live (default /var/tmp)",
                        default=Path("/var/tmp"))  # noqa: S108 - on disk, not a tmpfs /tmp: fsync costs what it costs
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="directory for the .md files")
    parser.add_argument("--no-fsync-audit", action="store_true",
                        help="skip the strace count of fsync calls (done at the first size only)")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--rtt", type=float, default=0.0, metavar="MS",
                        help="add this round-trip time between every tool and the server (a delaying proxy)")
    parser.add_argument("--count-trips", action="store_true",
                        help="count round trips at 0 ms too, through a zero-delay proxy (always on with --rtt)")
    parser.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                        help="only rebuild reports from saved results/*.json (smallest size first)")
    args = parser.parse_args(argv)
    unknown = [t for t in [*args.tools, *args.once] if t not in DEFAULT_TOOLS]
    if unknown:
        parser.error(f"unknown tools: {', '.join(unknown)}")
    if "mailsyncd" in args.tools:  # the ratios are mailsyncd/tool; run it first in every repetition
        args.tools.remove("mailsyncd")
        args.tools.insert(0, "mailsyncd")
    return args


def write_report(results: SizeResults, done: list[SizeResults], run: RunInfo, directory: Path) -> None:
    """Print the report and write it (and the raw figures, for --render) to the results directory."""
    text = report.render(results, done, run)
    rtt = f"-rtt{run.rtt:g}ms" if run.rtt or run.count_trips else ""  # -rtt0ms: through the zero-delay proxy
    stem = directory / f"{results.started[:10]}-{results.count}x{results.folders}{rtt}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"run": dataclasses.asdict(run), "results": results.to_json()},
                                                    indent=1) + "\n")
    print(text, flush=True)
    log(f"wrote {stem}.md and .json")


def render_again(paths: list[Path], directory: Path) -> int:
    """Rebuild reports from saved .json files (in size order, for the scaling table)."""
    done: list[SizeResults] = []
    for path in paths:
        data = json.loads(path.read_text())
        results = SizeResults.from_json(data["results"])
        done.append(results)
        write_report(results, done, RunInfo(**data["run"]), directory)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.render:
        return render_again(args.render, args.results)
    args.workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop Dovecot on the way out
    command = os.environ.get("BENCH_COMMAND") or " ".join(["python bench/bench.py", *sys.argv[1:]])
    chosen = [tools.ALL_TOOLS[t] for t in args.tools if t in tools.ALL_TOOLS]
    run = RunInfo(command, args.repeat, sorted(args.once), list(args.tools),
                  report.environment(args.workdir, chosen), args.rtt, args.count_trips or args.rtt > 0)
    done: list[SizeResults] = []
    for index, (count, folders) in enumerate(args.sizes):
        results = SizeRun(args, count, folders, audit=index == 0 and not args.no_fsync_audit).run()
        done.append(results)
        write_report(results, done, run, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

