"""
Builds the shared roster sync (L{xcauth.roster.sync}) the configuration asks for:
the command runner (ejabberd's HTTP API over its own small connection pool, or
the C{ejabberdctl} program), the fetcher over the domains' backends and the
state in the state database.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xcauth.daemon.config import Config
from xcauth.interfaces import ICommandRunner
from xcauth.roster.sync import (
    EjabberdctlRunner,
    HTTPCommandRunner,
    RosterSync,
    backendFetcher,
)
from xcauth.state.database import Store
from xcauth.state.roster import RosterState

#: Connections kept open to ejabberd's HTTP API (a sync sends its commands one
#: after the other; a few syncs run at once).
API_POOL_SIZE = 4


def makeRunner(config: Config, reactor: Any) -> ICommandRunner | None:
    """
    The command runner of C{config.rosterSync}, or C{None} for C{none}.
    """
    if config.rosterSync == "http":
        from treq.client import HTTPClient

        from xcauth.backends.http import makeAgent

        assert config.rosterApiURL is not None  # checked by the config
        # ejabberd's commands change state: no automatic retry.
        agent, pool = makeAgent(
            reactor,
            connectTimeout=config.rosterCommandTimeout,
            idleConnections=API_POOL_SIZE,
            retryAutomatically=False,
        )
        client = HTTPClient(agent)
        return HTTPCommandRunner(
            client, config.rosterApiURL, reactor, config.rosterCommandTimeout, pool=pool
        )
    if config.rosterSync == "ejabberdctl":
        assert config.ejabberdctl is not None  # checked by the config
        return EjabberdctlRunner(reactor, config.ejabberdctl, config.rosterCommandTimeout)
    return None


def makeRosterSync(
    config: Config,
    reactor: Any,
    settingsFor: Callable[[str], Any],
    store: Store,
) -> tuple[RosterSync | None, ICommandRunner | None]:
    """
    The roster sync and its runner (to close when stopping), or C{(None, None)}
    when the configuration asks for none.
    """
    runner = makeRunner(config, reactor)
    if runner is None:
        return None, None
    def tenantOf(domain: str) -> object | None:
        # Domains are one tenant when one backend client serves them.
        settings = settingsFor(domain)
        return None if settings is None else settings.client

    sync = RosterSync(
        backendFetcher(settingsFor), runner, RosterState(store), reactor, tenantOf=tenantOf
    )
    return sync, runner
