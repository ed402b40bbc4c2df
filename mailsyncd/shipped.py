"""Files that ship with the program: the example config and the systemd units.

They live at the top of the source tree (config/, systemd/), where the docs point, and inside the
wheel as ``mailsyncd._config`` and ``mailsyncd._systemd``, so an install from a wheel (pipx, a
venv) can print or install them without a source checkout.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from mailsyncd.errors import FatalError

EXAMPLE_CONFIG = "mailsyncd.example.toml"
SYSTEM_UNITS = ("mailsyncd.service", "mailsyncd-sync.service", "mailsyncd-sync.timer")
# The user unit is installed under the name its own comments and `systemctl --user` use.
USER_UNITS = {"mailsyncd.service": "mailsyncd-user.service"}


def example_config() -> str:
    return importlib.resources.files("mailsyncd._config").joinpath(EXAMPLE_CONFIG).read_text(encoding="utf-8")


def systemd_units(*, user: bool) -> dict[str, str]:
    """The units to install, by the file name they take in a unit directory."""
    names = USER_UNITS if user else {name: name for name in SYSTEM_UNITS}
    shipped = importlib.resources.files("mailsyncd._systemd")
    return {target: shipped.joinpath(source).read_text(encoding="utf-8") for target, source in names.items()}


def install_units(units: dict[str, str], directory: Path) -> list[Path]:
    """Write each unit into ``directory`` (made if missing), replacing an older copy.

    systemd reads them only at the next ``daemon-reload``. Local changes belong in drop-ins
    (``systemctl edit``), which this leaves alone.
    """
    written: list[Path] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            target = directory / name
            target.write_text(text, encoding="utf-8")
            target.chmod(0o644)
            written.append(target)
    except OSError as error:
        raise FatalError(f"cannot install the units into {directory}: {error.strerror or error}") from error
    return written
