"""One mailsyncd sync pass timed from inside the process, without interpreter start-up.

``python mailsyncd_noop.py CONFIG`` prints JSON: seconds spent importing mailsyncd, in
``App.open`` (database open + migration check) and in ``sync_account`` for each account, so a
no-op pass can be compared with a whole mbsync run apart from Python's own start-up.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(config_path: str) -> int:
    started = time.perf_counter()
    from mailsyncd.app import App
    from mailsyncd.config import load_config
    from mailsyncd.state import db

    imported = time.perf_counter()
    config = load_config(Path(config_path))
    with db.instance_lock(config.general.state):
        opening = time.perf_counter()
        app = App.open(config)
        opened = time.perf_counter()
        try:
            for account in config.accounts:
                app.sync_account(account)
        finally:
            synced = time.perf_counter()
            app.close()
    json.dump({"import": imported - started, "open": opened - opening, "sync": synced - opened,
               "open_and_sync": synced - opening}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
