"""Command line: arguments in, one clear line per problem out, exit codes 0/1/2.

This is the only place where errors become exit codes: 0 when all requested work
succeeded, 1 when some account or folder failed (the others still synced), 2 for usage,
config and other fatal errors. Tracebacks only with --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailsyncd import __version__, shipped
from mailsyncd import config as config_module
from mailsyncd import log as log_setup
from mailsyncd.app import App, load
from mailsyncd.config import AccountConfig, Config, load_account_file
from mailsyncd.domain import AccountStatus, PopCheck, RunResult
from mailsyncd.errors import AccountBusy, AccountError, AlreadyRunning, ConfigError, FatalError, MailsyncError
from mailsyncd.oauth2 import authorize_in_browser, authorize_on_device, token_location, token_status
from mailsyncd.progress import Progress, TerminalProgress
from mailsyncd.state import db, definitions
from mailsyncd.state.leases import Holder

log = logging.getLogger("mailsyncd")

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"mailsyncd: {message}\n")


def _add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before or after its name (``mailsyncd sync -v``).
    A subcommand's copy has no defaults, so it never overwrites what was given before."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--config", type=Path, default=default(None), help="config file (TOML)")
    parser.add_argument("-v", "--verbose", action="count", default=default(0),
                        help="debug logging and tracebacks; -vv adds a protocol trace, credentials and "
                             "message bodies left out")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="only warnings and errors")


class _SubcommandParser(_Parser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_global_options(self, defaults=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mailsyncd",
        description="Pull mail over IMAP and POP3 into Maildir or mbox, durably and exactly once.",
        epilog="Exit status: 0 all requested work succeeded, 1 some account or folder failed, "
               "2 usage or config error. Config: --config, else $MAILSYNCD_CONFIG, else "
               "$XDG_CONFIG_HOME/mailsyncd/config.toml.")
    _add_global_options(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"mailsyncd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_SubcommandParser)

    sync = commands.add_parser("sync", help="one pass over the accounts, then exit")
    sync.add_argument("--account", action="append", default=[], metavar="NAME", help="only this account "
                      "(repeatable)")
    sync.add_argument("--folder", action="append", default=[], metavar="GLOB", help="only folders matching "
                      "(repeatable; IMAP)")
    sync.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    sync.add_argument("--dry-run", action="store_true", help='mode = "sync": print what a pass would do in each '
                      "direction, and change nothing")
    sync.add_argument("--allow-deletions", action="append", default=[], metavar="FOLDER",
                      help='mode = "sync": let this pass delete in FOLDER past the deletion guard (repeatable)')

    commands.add_parser("run", help="the daemon, in the foreground: scheduled syncs, IDLE push, SIGHUP "
                        "reloads the config")

    status = commands.add_parser("status", help="per account and folder: last run, result, counts")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    commands.add_parser("check", help="validate the config, connect, log in, list folders; change nothing "
                        "(but an OAuth2 access token is refreshed)")

    auth = commands.add_parser("auth", help="OAuth2 first login for an account: browser (loopback redirect) "
                               "or --device; stores the refresh token")
    auth.add_argument("name", metavar="NAME", help="the account")
    how = auth.add_mutually_exclusive_group()
    how.add_argument("--device", action="store_true", help="log in on another device with a code (for servers "
                     "without a browser)")
    how.add_argument("--no-browser", action="store_true", help="only print the URL, and wait on the loopback "
                     "port (e.g. forwarded with ssh -L)")
    auth.add_argument("--port", type=int, default=0, help="the loopback port to wait on (default: any free one)")

    fetch = commands.add_parser("fetch", help="replace a placeholder by the whole message")
    fetch.add_argument("account", metavar="NAME", help="the account")
    fetch.add_argument("folder", metavar="FOLDER", help="the folder, as the server names it (POP3: INBOX)")
    which = fetch.add_mutually_exclusive_group(required=True)
    which.add_argument("--uid", metavar="N", help="the message's UID (POP3: its UIDL), as the placeholder says")
    which.add_argument("--message-id", metavar="ID", help="the message's Message-ID, <...> included")

    adopt = commands.add_parser("adopt", help="take over a store another program wrote (mbsync, offlineimap, "
                                "getmail) or a lost state database left: match it with the server, fetch only "
                                "what is missing")
    adopt.add_argument("name", metavar="NAME", help="the account")
    adopt.add_argument("--dry-run", action="store_true", help="only report what would be matched, fetched "
                       "and left local only; change nothing")

    wake = commands.add_parser("wake", help="ask the running daemons to sync these accounts (default: every "
                               "account) now", description="On a PostgreSQL state, every daemon sharing it hears "
                               "this at once (LISTEN/NOTIFY) and the first to claim an account syncs it. On SQLite, "
                               "the one daemon is sent SIGUSR1, which syncs every account. Returns at once; "
                               "`mailsyncd status` shows the runs.")
    wake.add_argument("accounts", nargs="*", metavar="ACCOUNT", help="an account to sync now")
    _add_accounts_commands(commands)

    database = commands.add_parser("db", help="state database maintenance")
    database_commands = database.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    database_commands.add_parser("upgrade", help="apply migrations (also done at start)")

    demo = commands.add_parser("demo", help="sync a throwaway local Dovecot into a local store; no account "
                               "needed")
    demo.add_argument("--dir", type=Path, default=None, help="where to put the demo (default: a temp dir)")
    demo.add_argument("--messages", type=int, default=300, help="how many messages to generate")
    _add_shipped_commands(commands)
    return parser


def _add_accounts_commands(commands: argparse._SubParsersAction[_SubcommandParser]) -> None:
    """``accounts import | list | remove``: accounts kept in the state database."""
    accounts = commands.add_parser(
        "accounts", help="accounts kept in the state database beside the config file's: import, list, remove",
        description="For many accounts and several daemons sharing one (PostgreSQL) state: account definitions "
                    "kept in the state database, which every daemon picks up within seconds, without a restart. "
                    "The config file's accounts stay; a name in both is the config file's.")
    subcommands = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACCOUNTS_COMMAND",
                                          parser_class=_SubcommandParser)
    imported = subcommands.add_parser(
        "import", help="add or update the [[account]] tables of FILE", description="Check every [[account]] table "
        "of FILE exactly as the config file's are checked, then store them all, or none if one is wrong. An "
        "account of the same name is updated. Secrets are never stored: an inline password or client_secret is "
        "refused; use password_command, password_file, password_env, keyring or OAuth2 (its token stays in its "
        "token store). Relative paths count from FILE's directory.")
    imported.add_argument("file", type=Path, metavar="FILE.toml", help="a TOML file of [[account]] tables")
    imported.add_argument("--dry-run", action="store_true", help="check FILE and say what would be added or "
                          "updated; write nothing")
    listed = subcommands.add_parser("list", help="every account: name, protocol, user@server, and where it is "
                                    "defined (file or database)")
    listed.add_argument("--json", action="store_true", help="machine-readable output")
    removed = subcommands.add_parser(
        "remove", help="remove an account kept in the state database", description="The daemons stop scheduling "
        "it within seconds; a sync of it under way finishes. Its store and its state rows are kept: importing "
        "it again goes on where it left off.")
    removed.add_argument("name", metavar="NAME", help="the account")
    removed.add_argument("--dry-run", action="store_true", help="say what would be removed; change nothing")


def _add_shipped_commands(commands: argparse._SubParsersAction[_SubcommandParser]) -> None:
    """Commands that hand out the files shipped with the program; they need no config."""
    commands.add_parser("example-config", help="print the example config, every key explained")
    units = commands.add_parser("systemd-units", help="print the systemd units, or install them with --install")
    units.add_argument("--user", action="store_true", help="the unit for a user's own systemd instance "
                       "(runs %%h/.local/bin/mailsyncd, where pipx puts it)")
    units.add_argument("--install", type=Path, metavar="DIR", help="write the units into DIR, e.g. "
                       "~/.config/systemd/user or /etc/systemd/system")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_setup.setup(verbose=args.verbose > 0, quiet=args.quiet, trace=args.verbose > 1)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, where a reader gone away can be told apart
        return code
    except BrokenPipeError:
        # The reader went away (``mailsyncd status | head``): nothing more to say to it.
        # Point stdout at /dev/null so that the interpreter's final flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PARTIAL
    except FatalError as error:
        _report(error, args.verbose > 0)
        return error.exit_code
    except MailsyncError as error:
        _report(error, args.verbose > 0)
        return EXIT_PARTIAL
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def _report(error: BaseException, verbose: bool) -> None:
    log.error("%s", error, exc_info=verbose)


def _load(args: argparse.Namespace) -> Config:
    path = args.config or config_module.default_config_path()
    config = load(path)
    if not args.verbose and not args.quiet:
        logging.getLogger("mailsyncd").setLevel(config.general.log_level.upper())
    return config


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("example-config", "systemd-units"):
        return _shipped_files(args)
    if args.command == "demo":
        from mailsyncd.demo import run_demo  # only the demo needs the local server

        return run_demo(args.dir, args.messages)
    config = _load(args)
    if args.command == "sync":
        return _sync(config, args)
    if args.command == "run":
        from mailsyncd.service.daemon import run  # only the daemon needs APScheduler

        return run(config)
    if args.command == "status":
        return _status(config, args.json)
    if args.command == "check":
        return _check(config)
    if args.command == "fetch":
        return _fetch(config, args)
    if args.command == "auth":
        return _auth(config, args)
    if args.command == "adopt":
        return _adopt(config, args.name, args.dry_run)
    if args.command == "accounts":
        return _accounts(config, args)
    if args.command == "wake":
        return _wake(config, args.accounts)
    return _db_upgrade(config)


def _selected(config: Config, names: Sequence[str]) -> list[AccountConfig]:
    unknown = [name for name in names if name not in {account.name for account in config.accounts}]
    if unknown:
        where = f"{config.path} or the state database" if config.stored else str(config.path)
        raise FatalError(f"no account named {', '.join(unknown)} in {where}; have: "
                         f"{', '.join(account.name for account in config.accounts) or 'none'}")
    return [account for account in config.accounts if not names or account.name in names]


def _sync(config: Config, args: argparse.Namespace) -> int:
    accounts = _selected(config, args.account)
    if not accounts:
        log.warning("%s has no [[account]]; try `mailsyncd demo` or see `mailsyncd example-config`",
                    config.path)
        return EXIT_OK
    progress: Progress | None = None
    if sys.stdout.isatty() and not args.no_progress and not args.quiet:
        progress = TerminalProgress(sys.stdout)
    failed = False
    with contextlib.ExitStack() as held:
        if progress is not None:
            held.callback(progress.close)
        try:
            held.enter_context(db.instance_lock(config.general.state))
        except AlreadyRunning as running:
            if running.daemon_pid is None or args.folder or args.dry_run or args.allow_deletions:
                raise  # the daemon syncs whole accounts only, with their configured guard
            return _sync_by_daemon(config, accounts, running.daemon_pid)
        app = held.enter_context(App.open(config))
        for account in accounts:
            try:
                counts = app.sync_account(account, args.folder, progress, dry_run=args.dry_run,
                                          allow_deletions=args.allow_deletions)
            except AccountBusy as busy:
                log.warning("%s", busy)  # another daemon syncs it now, which is what was asked
                continue
            except AccountError as error:
                log.error("%s", error, exc_info=args.verbose > 0)
                failed = True
                continue
            except Exception as error:  # a bug: one line (the traceback with -v), the other accounts go on
                log.error("%s: sync failed unexpectedly: %s: %s (a bug; -v shows where)", account.name,
                          type(error).__name__, error, exc_info=args.verbose > 0)
                failed = True
                continue
            for line in counts.report:
                print(f"{account.name}/{line}")
            failed = failed or bool(counts.errors)
    return EXIT_PARTIAL if failed else EXIT_OK


def _fetch(config: Config, args: argparse.Namespace) -> int:
    (account,) = _selected(config, [args.account])
    with db.instance_lock(config.general.state), App.open(config) as app:
        where = app.fetch_whole(account, args.folder, args.uid, args.message_id)
    print(f"{account.name}: fetched in full: {where}")
    return EXIT_OK


def _sync_by_daemon(config: Config, accounts: Sequence[AccountConfig], pid: int) -> int:
    """``mailsyncd run`` holds the state database: it syncs, and this process reports."""
    from mailsyncd.service.control import sync_by_daemon

    log.info("mailsyncd run (pid %d) is running: asking it to sync now", pid)
    with App.open(config) as app:
        runs = sync_by_daemon(app, pid, [account.name for account in accounts])
    failed = False
    for name, run in sorted(runs.items()):
        if run.result is RunResult.OK:
            log.info("%s: synced by the daemon: %d new (%d bytes)", name, run.fetched, run.fetched_bytes)
            continue
        failed = True
        problem = run.error or str(run.result)
        # An account's error names the account already; a folder's names only its folder.
        log.error("%s", problem if problem.startswith(f"{name}: ") else f"{name}: {problem}")
    return EXIT_PARTIAL if failed else EXIT_OK


def _status(config: Config, as_json: bool) -> int:
    with App.open(config) as app:
        report = app.status()
        holders = app.holders()
    if as_json:
        json.dump([_status_json(entry, holders.get(entry.account)) for entry in report], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if not report:
        print("no sync has run yet")
    for entry in report:
        run = entry.last_run
        print(f"{entry.account} ({entry.protocol}): last run {_when(run.finished if run else None) or 'never'} "
              f"{run.result if run else ''}; last success {_when(entry.last_success) or 'never'}"
              + (f"; error: {run.error}" if run and run.error else ""))
        holder = holders.get(entry.account)
        if holder is not None and holder.owner is not None:
            print(f"  held by {holder.owner} since {_when(holder.since)}, lease until {_when(holder.until)}")
        for folder in entry.folders:
            counts = ", ".join(f"{count} {state}" for state, count in sorted(folder.messages.items()))
            note = "" if folder.on_server else " (gone from the server)"
            error = f" error: {folder.last_error}" if folder.last_error else ""
            both_ways = "" if folder.pushed is None else \
                f"; last pass: {folder.pushed} changes to the server, {folder.pulled} here"
            print(f"  {folder.name}: {counts or 'empty'}; synced {_when(folder.last_sync) or 'never'}{both_ways}"
                  f"{note}{error}")
        if entry.pop_messages:
            print("  POP: " + ", ".join(f"{count} {state}" for state, count in sorted(entry.pop_messages.items())))
    return EXIT_OK


def _when(moment: datetime | None) -> str | None:
    """Local time with its UTC offset, as the log lines show it."""
    return None if moment is None else moment.astimezone().isoformat(timespec="seconds")


def _status_json(entry: AccountStatus, holder: Holder | None) -> dict[str, Any]:
    """One account for ``status --json``; these keys are an interface, kept stable."""
    run = entry.last_run
    report: dict[str, Any] = {
        "account": entry.account, "protocol": entry.protocol,
        "last_run": None if run is None else {
            "started": _when(run.started), "finished": _when(run.finished), "result": str(run.result),
            "fetched": run.fetched, "bytes": run.fetched_bytes, "error": run.error},
        "last_success": _when(entry.last_success),
        "folders": [{"name": folder.name, "path": folder.path, "last_sync": _when(folder.last_sync),
                     "last_error": folder.last_error, "on_server": folder.on_server,
                     "uidvalidity": folder.uidvalidity, "messages": dict(folder.messages),
                     "placeholders": [{"uid": uid, "size": size, "message_id": found_id}
                                      for uid, size, found_id in folder.placeholders],
                     **({} if folder.pushed is None else {"pushed": folder.pushed, "pulled": folder.pulled})}
                    for folder in entry.folders],
        "pop_messages": dict(entry.pop_messages),
        "configured": entry.configured,
        "lease": None if holder is None or holder.owner is None else {
            "owner": holder.owner, "since": _when(holder.since), "until": _when(holder.until)},
    }
    if entry.schedule is not None:
        report["schedule"] = entry.schedule
    return report


def _check(config: Config) -> int:
    failed = False
    for account in config.accounts:
        try:
            if account.auth == "oauth2":
                token = token_status(account)
                print(f"{account.name}: OAuth2 login of {_when(token.issued)}, the refresh works; access token "
                      f"good until {_when(token.expires) or 'unknown'}")
            result = App.check(account)
        except AccountError as error:
            print(f"{account.name}: FAILED: {error}")
            failed = True
            continue
        if isinstance(result, PopCheck):
            print(f"{account.name}: ok, {result.messages} messages ({result.size} bytes) on the server, "
                  f"logged in with {result.login_method}")
        else:
            print(f"{account.name}: ok, {len(result.folders)} folders, {len(result.selected)} selected: "
                  + ", ".join(result.selected))
    print(f"{config.path}: config ok, {len(config.accounts)} accounts")
    return EXIT_PARTIAL if failed else EXIT_OK


def _auth(config: Config, args: argparse.Namespace) -> int:
    """The first OAuth2 login; failures are one line and exit 1, as for a sync."""
    (account,) = _selected(config, [args.name])
    if account.auth != "oauth2":
        raise FatalError(f'{config.path}: account "{account.name}".auth: is "{account.auth}"; mailsyncd auth '
                         'is for auth = "oauth2" with an [account.oauth2] table')

    def say(text: str) -> None:
        print(text, flush=True)

    if args.device:
        authorize_on_device(account, say)
    else:
        authorize_in_browser(account, say, open_browser=not args.no_browser, port=args.port)
    print(f"{account.name}: logged in; the refresh token is in {token_location(account)}")
    return EXIT_OK


def _adopt(config: Config, name: str, dry_run: bool) -> int:
    [account] = _selected(config, [name])
    with db.instance_lock(config.general.state), App.open(config) as app:
        previews, counts = app.adopt(account, dry_run)
        status = {entry.account: entry for entry in app.status()}.get(account.name)
    for preview in previews:
        if preview.recorded:
            print(f"{preview.folder}: already in the state database; synced as usual")
        elif account.protocol == "pop3":
            print(f"{preview.folder}: {preview.found} messages in the store, {preview.fetch} on the server: each is "
                  "retrieved and compared by content; a copy already in the store is not stored again")
        else:
            print(f"{preview.folder}: {preview.found} messages in the store: {preview.matched} matched by "
                  f"Message-ID and size, {preview.fetch} to fetch (compared by content first), "
                  f"{preview.local_only} local only so far")
    if counts is None:
        print("dry run: nothing was changed")
        return EXIT_OK
    local_only = 0
    if status is not None:
        local_only = sum(folder.messages.get("retired", 0) for folder in status.folders)
        local_only += status.pop_messages.get("retired", 0)
    print(f"{account.name}: {counts.adopted} matched and recorded where they lie, {counts.fetched} new stored "
          f"({counts.fetched_bytes} bytes), {local_only} local only (kept, never removed)")
    return EXIT_PARTIAL if counts.errors else EXIT_OK


def _open_shared(config: Config) -> App:
    """The state database for a command that may run beside the daemon (accounts, wake):
    migrated under the instance lock when nobody holds it; a daemon holding it has
    migrated it at its start already."""
    try:
        with db.instance_lock(config.general.state):
            return App.open(config)
    except AlreadyRunning:
        return App.open(config)


def _accounts(config: Config, args: argparse.Namespace) -> int:
    in_file = {account.name: account for account in config.accounts if account.name not in config.stored}
    if args.accounts_command == "list":
        return _accounts_list(config, in_file, args.json)
    with _open_shared(config) as app:
        where = db.location(config.general.state)
        if args.accounts_command == "import":
            return _accounts_import(config, app, in_file, args.file, args.dry_run, where)
        return _accounts_remove(config, app, in_file, args.name, args.dry_run, where)


def _accounts_import(config: Config, app: App, in_file: dict[str, AccountConfig], path: Path, dry_run: bool,
                     where: str) -> int:
    from mailsyncd.service.schedule import schedule_for

    parsed = load_account_file(path, config.general.state)
    for account, _ in parsed:
        # A crontab the daemons cannot read would fail every reload, and hold up every later change.
        schedule_for(account, path, UTC)
        if account.name in in_file:
            raise ConfigError(path, f'account "{account.name}".name', f"{config.path} defines this account too, and "
                              "its definition would win; rename it here or remove it there")
    base = path.parent.absolute()
    with db.state_errors(config.general.state):
        outcome = definitions.save(app.engine, [definitions.Definition(account.name, table, base)
                                                for account, table in parsed], dry_run=dry_run)
    for account, _ in parsed:
        said = outcome[account.name] if not dry_run or outcome[account.name] == "unchanged" else \
            f"would be {outcome[account.name]}"
        print(f"{account.name}: {said} ({account.protocol}, {account.username}@{account.host})")
    if dry_run:
        print(f"dry run: {path} is valid; nothing was written")
    else:
        print(f"{where}: {_count(len(parsed))} from {path}; running daemons pick the changes up within seconds")
    return EXIT_OK


def _accounts_remove(config: Config, app: App, in_file: dict[str, AccountConfig], name: str, dry_run: bool,
                     where: str) -> int:
    if name in in_file:
        raise ConfigError(config.path, f'account "{name}"', "is defined in this file, not in the state database; "
                          "remove it there (and reload the daemon)")
    if name not in config.stored:
        raise FatalError(f"{where}: holds no account named {name}; have: {', '.join(sorted(config.stored)) or 'none'}")
    store = config.account(name).store.path
    if dry_run:
        print(f"{name}: would be removed from {where}; its store {store} and its state rows would be kept")
        return EXIT_OK
    with db.state_errors(config.general.state):
        definitions.remove(app.engine, name)
    print(f"{name}: removed from {where}; daemons stop scheduling it within seconds (a sync under way finishes). "
          f"Its store {store} and its state rows are kept: importing it again goes on from there")
    return EXIT_OK


def _accounts_list(config: Config, in_file: dict[str, AccountConfig], as_json: bool) -> int:
    entries = [{"name": account.name, "protocol": account.protocol, "host": account.host, "port": account.port,
                "username": account.username, "source": "database" if account.name in config.stored else "file",
                "shadowed": account.name in config.shadowed} for account in config.accounts]
    if as_json:
        json.dump(entries, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    for entry in entries:
        note = " (also in the database, whose definition is not used)" if entry["shadowed"] else ""
        print(f"{entry['name']}  {entry['protocol']}  {entry['username']}@{entry['host']}:{entry['port']}  "
              f"{entry['source']}{note}")
    print(f"{_count(len(in_file))} in {config.path}, {len(config.stored)} in {db.location(config.general.state)}")
    return EXIT_OK


def _count(accounts: int) -> str:
    return "1 account" if accounts == 1 else f"{accounts} accounts"


def _wake(config: Config, names: Sequence[str]) -> int:
    _selected(config, names)
    where = db.location(config.general.state)
    if db.sqlite_path(db.database_url(config.general.state)) is not None:
        from mailsyncd.service.control import ask_daemon

        try:
            with db.instance_lock(config.general.state):
                pass
        except AlreadyRunning as running:
            if running.daemon_pid is None:
                raise
            ask_daemon(running.daemon_pid)
            print(f"asked mailsyncd run (pid {running.daemon_pid}) to sync every account now: on SQLite it is "
                  "the one daemon, and its signal (SIGUSR1) names no account")
            return EXIT_OK
        log.error("no mailsyncd run uses %s: nothing was asked; `mailsyncd sync` syncs now in this process", where)
        return EXIT_PARTIAL
    with App.open(config) as app, db.state_errors(config.general.state):
        listening = definitions.listeners(app.engine)
        definitions.wake(app.engine, names)
    what = ", ".join(names) or "every account"
    if not listening:
        log.error("no mailsyncd run listens on %s: nothing will sync %s until one starts", where, what)
        return EXIT_PARTIAL
    print(f"asked the {listening} daemons listening on {where} to sync {what} now")
    return EXIT_OK


def _db_upgrade(config: Config) -> int:
    with db.instance_lock(config.general.state), App.open(config):
        pass  # opening migrates to the newest schema
    print(f"state database is at the newest schema: {config.general.state}")
    return EXIT_OK


def _shipped_files(args: argparse.Namespace) -> int:
    """Print the example config or the units, or write the units where systemd looks for them."""
    if args.command == "example-config":
        sys.stdout.write(shipped.example_config())
        return EXIT_OK
    units = shipped.systemd_units(user=args.user)
    if args.install is None:
        for name, text in units.items():
            sys.stdout.write(f"# --- {name} ---\n{text}" if len(units) > 1 else text)
        return EXIT_OK
    for path in shipped.install_units(units, args.install.expanduser()):
        print(f"installed {path}")
    print(f"now run: systemctl{' --user' if args.user else ''} daemon-reload")
    return EXIT_OK
