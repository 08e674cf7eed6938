"""
End-to-end tests: the real C{twistd xcauth} and C{xcauth} processes, the real
Debian clients (ejabberd, Prosody, saslauthd, Postfix) and the fake Nextcloud,
on loopback, started through L{tests.harness}.
"""
