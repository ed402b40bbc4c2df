"""A private, throwaway Dovecot server for the demo, the benchmarks and the tests.

:class:`DovecotServer` starts and stops one Dovecot on loopback, creates its users and appends
mail to them; that is all ``mailsyncd demo`` needs. Reading a mailbox back (flags, bytes,
folder lists) is the tests' business and lives with them. The rooms:

- :mod:`.launch`: find the binary, start the master, wait for every port to greet, stop it;
- :mod:`.dovecot_config`: the generated ``dovecot.conf`` and the throwaway CA;
- :mod:`.users`: one passwd-file per user, and the mail directories' owner;
- :mod:`.fill`: stdlib IMAP sessions and byte-exact MULTIAPPEND;
- :mod:`.server`: the class that ties them to one working directory.

Nothing in the sync engine imports this package (an import contract checks it).
"""

from mailsyncd.testing.launch import DovecotError, find_dovecot
from mailsyncd.testing.server import DovecotServer

__all__ = ["DovecotError", "DovecotServer", "find_dovecot"]
