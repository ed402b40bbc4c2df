"""mailsyncd: pull mail over IMAP and POP3 into Maildir or mbox, durably and exactly once."""

__version__ = "0.1.0"
