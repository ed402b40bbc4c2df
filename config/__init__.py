"""The example config; ships inside the wheel as ``mailsyncd._config`` for `mailsyncd example-config`."""
