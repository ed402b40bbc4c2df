"""Time one sync of the real-message corpus (tests/corpus) into Maildir or mbox.

``.venv/bin/python bench/corpus_sync.py maildir|mbox`` appends the 821 corpus messages
to six folders of a private Dovecot (non-ASCII and dotted names included), then runs
``mailsyncd sync`` twice under /usr/bin/time: the initial sync and a no-op resync. The
figures include interpreter start-up, as a user would see them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mailsyncd.testing import DovecotServer  # noqa: E402 - after the path set-up above
from tests.helpers import corpus_messages, write_config  # noqa: E402

FOLDERS = ["INBOX", "Archive/2024", "Entwürfe", "Входящие", "A & B", "Lists/debian.devel"]


def timed(config: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, peak RSS KiB) of one `mailsyncd sync`."""
    done = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", str(REPO / ".venv/bin/mailsyncd"),
                           "--config", str(config), "-q", "sync"], capture_output=True, text=True, check=True)
    wall, user, system, rss = done.stderr.strip().splitlines()[-1].split()
    return float(wall), float(user) + float(system), int(rss)


def main(store_format: str) -> None:
    files = corpus_messages()
    with tempfile.TemporaryDirectory(prefix="mailsyncd-corpus-") as work, \
            DovecotServer(Path(work) / "server", users=(("u", "pw"),)) as server:
        for index, folder in enumerate(FOLDERS):
            server.append_many("u", folder, [path.read_bytes() for path in files[index::len(FOLDERS)]])
        config = write_config(Path(work), server, "u", "pw", store_format)
        wall, cpu, rss = timed(config)
        print(f"{store_format} initial: {len(files)} messages in {wall:.2f} s wall ({len(files) / wall:.0f} msg/s), "
              f"{cpu:.2f} s CPU, peak RSS {rss // 1024} MiB")
        wall, cpu, rss = timed(config)
        print(f"{store_format} no-op: {wall:.2f} s wall, {cpu:.2f} s CPU, peak RSS {rss // 1024} MiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "maildir")
