"""
twistd plugin for xcauth: C{twistd xcauth --help}.  Imports nothing heavy.
"""

from twisted.application.service import ServiceMaker

xcauth = ServiceMaker(
    "xcauth",
    "xcauth.daemon.tap",
    "Authentication hub for ejabberd, Prosody, saslauthd and Postfix "
    "backed by Nextcloud/JSXC",
    "xcauth",
)
