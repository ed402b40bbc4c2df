"""The systemd units; ship inside the wheel as ``mailsyncd._systemd`` for `mailsyncd systemd-units`."""
