"""
xcauth: an authentication hub for XMPP and mail servers.

One Twisted daemon answers ejabberd, Prosody, saslauthd and Postfix questions
("is this password right?", "does this user exist?") from a Nextcloud server with
the JSXC app, from locally verified time-limited tokens and from an optional cache.
"""

__version__ = "2.0.0"
