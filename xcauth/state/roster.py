"""
The roster sync's state in the state database, in the C{rosterinfo} and
C{rostergroups} tables of existing installations (PROTOCOLS.md), used as they
are:

 - C{rosterinfo}: one row per JID (C{user@domain}): C{fullname} (the full name
   last set in its vCard), C{grouplist} (the shared roster groups the user was
   put in at its last sync, tab-separated), C{responsehash} (SHA-256 of the
   backend's last roster answer, hex) and C{last_update}.
 - C{rostergroups}: one row per group, keyed C{GROUP@DOMAIN}: C{userlist}, the
   members' JIDs, tab-separated and sorted.

The functions taking a C{sqlite3.Connection} are synchronous (the admin command
calls them directly); L{RosterState} runs them on the daemon's database thread
through L{xcauth.state.database.Store.run}.  Rows are created with C{INSERT ... ON CONFLICT DO NOTHING}
and then updated column by column, so columns people added themselves keep
their values.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import attr
from twisted.internet.defer import Deferred

from xcauth.state.database import Connection, Store, formatTimestamp, transaction

#: The separator of C{grouplist} and C{userlist}, as older installations wrote them.
SEPARATOR = "\t"


@attr.s(frozen=True, auto_attribs=True)
class RosterInfo:
    """
    One C{rosterinfo} row.
    """

    jid: str
    fullname: str | None
    groups: tuple[str, ...]
    responsehash: str | None


def _split(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(part for part in text.split(SEPARATOR) if part)


def groupKey(group: str, domain: str) -> str:
    """
    The C{rostergroups} key of a group: C{GROUP@DOMAIN}, as older versions wrote
    it (clean group names hold no C{@}).
    """
    return f"{group}@{domain}"


def getRosterInfo(conn: Connection, jid: str) -> RosterInfo | None:
    """
    The C{rosterinfo} row of C{jid}, or C{None}.
    """
    row = conn.execute(
        "SELECT fullname, grouplist, responsehash FROM rosterinfo WHERE jid = ?", (jid,)
    ).fetchone()
    if row is None:
        return None
    return RosterInfo(jid, row[0], _split(row[1]), row[2])


def getFullNames(conn: Connection, jids: Iterable[str]) -> dict[str, str | None]:
    """
    The stored full names of C{jids} (C{None} for a JID without one).
    """
    names: dict[str, str | None] = {}
    for jid in jids:
        row = conn.execute(
            "SELECT fullname FROM rosterinfo WHERE jid = ?", (jid,)
        ).fetchone()
        names[jid] = None if row is None else row[0]
    return names


def _ensureInfoRow(conn: Connection, jid: str) -> None:
    conn.execute("INSERT INTO rosterinfo (jid) VALUES (?) ON CONFLICT DO NOTHING", (jid,))


def setFullName(conn: Connection, jid: str, fullname: str) -> None:
    """
    Record that the vCard full name of C{jid} is C{fullname}.
    """
    with transaction(conn):
        _ensureInfoRow(conn, jid)
        conn.execute("UPDATE rosterinfo SET fullname = ? WHERE jid = ?", (fullname, jid))


def setSynced(
    conn: Connection,
    jid: str,
    groups: Iterable[str],
    responsehash: str,
    now: float,
) -> None:
    """
    Record a finished sync of C{jid}: the groups it is in and the hash of the
    answer that was synced.
    """
    with transaction(conn):
        _ensureInfoRow(conn, jid)
        conn.execute(
            "UPDATE rosterinfo SET grouplist = ?, responsehash = ?, last_update = ? "
            "WHERE jid = ?",
            (SEPARATOR.join(sorted(groups)), responsehash, formatTimestamp(now), jid),
        )


def getGroupMembers(
    conn: Connection, keys: Iterable[str]
) -> dict[str, tuple[str, ...] | None]:
    """
    The stored members of the groups C{keys} (C{None} for a group without a row:
    one this program has not created).
    """
    members: dict[str, tuple[str, ...] | None] = {}
    for key in keys:
        row = conn.execute(
            "SELECT userlist FROM rostergroups WHERE groupname = ?", (key,)
        ).fetchone()
        members[key] = None if row is None else _split(row[0])
    return members


def setGroupMembers(conn: Connection, key: str, members: Iterable[str]) -> None:
    """
    Record the members of the group C{key}.
    """
    with transaction(conn):
        conn.execute(
            "INSERT INTO rostergroups (groupname) VALUES (?) ON CONFLICT DO NOTHING", (key,)
        )
        conn.execute(
            "UPDATE rostergroups SET userlist = ? WHERE groupname = ?",
            (SEPARATOR.join(sorted(set(members))), key),
        )


def removeGroupMember(conn: Connection, key: str, jid: str) -> None:
    """
    Record that C{jid} left the group C{key} (nothing if the group has no row).
    """
    with transaction(conn):
        row = conn.execute(
            "SELECT userlist FROM rostergroups WHERE groupname = ?", (key,)
        ).fetchone()
        if row is None:
            return
        kept = [m for m in _split(row[0]) if m != jid]
        conn.execute(
            "UPDATE rostergroups SET userlist = ? WHERE groupname = ?",
            (SEPARATOR.join(kept), key),
        )



def forgetRoster(conn: Connection, jid: str | None = None) -> int:
    """
    Forget what the last sync of C{jid} (of every JID for C{None}) stored, so
    that the next login syncs everything again: the answer hash, the full name
    and the groups' stored members (ejabberd is asked for them again).  The
    user's group list is kept, so that groups it has left since are still
    left.  Returns the number of C{rosterinfo} rows changed.
    """
    with transaction(conn):
        if jid is None:
            cursor = conn.execute(
                "UPDATE rosterinfo SET responsehash = NULL, fullname = NULL"
            )
            conn.execute("DELETE FROM rostergroups")
            return cursor.rowcount
        row = conn.execute(
            "SELECT grouplist FROM rosterinfo WHERE jid = ?", (jid,)
        ).fetchone()
        if row is None:
            return 0
        domain = jid.rpartition("@")[2]
        for group in _split(row[0]):
            conn.execute(
                "DELETE FROM rostergroups WHERE groupname = ?", (groupKey(group, domain),)
            )
        cursor = conn.execute(
            "UPDATE rosterinfo SET responsehash = NULL, fullname = NULL WHERE jid = ?",
            (jid,),
        )
        return cursor.rowcount


def claimSync(
    conn: Connection, jid: str, node: str, now: float, seconds: float
) -> bool:
    """
    Claim the roster sync of C{jid} for C{node} for C{seconds}: C{True} if
    no other node holds an unexpired claim (several nodes sharing one
    database then run one sync per user).
    """
    with transaction(conn):
        cursor = conn.execute(
            "INSERT INTO rosterclaims (jid, node, expires) VALUES (?, ?, ?) "
            "ON CONFLICT (jid) DO UPDATE SET node = excluded.node, "
            "expires = excluded.expires "
            "WHERE rosterclaims.expires < ? OR rosterclaims.node = excluded.node",
            (jid, node, now + seconds, now),
        )
        return cursor.rowcount > 0


def releaseSync(conn: Connection, jid: str, node: str) -> None:
    """
    Give up C{node}'s claim on the roster sync of C{jid} (if it holds it).
    """
    with transaction(conn):
        conn.execute("DELETE FROM rosterclaims WHERE jid = ? AND node = ?", (jid, node))


class RosterState:
    """
    The roster sync's state in the daemon's L{Store} (every call on its database
    thread).

    @param node: this daemon's name in sync claims (a random one by default).
    """

    def __init__(self, store: Store, node: str | None = None) -> None:
        self._store = store
        self.node = node if node is not None else uuid.uuid4().hex

    def claim(self, jid: str, now: float, seconds: float) -> Deferred[bool]:
        """
        See L{claimSync}.
        """
        return self._store.run(claimSync, jid, self.node, now, seconds)

    def release(self, jid: str) -> Deferred[None]:
        """
        See L{releaseSync}.
        """
        return self._store.run(releaseSync, jid, self.node)

    def info(self, jid: str) -> Deferred[RosterInfo | None]:
        """
        See L{getRosterInfo}.
        """
        return self._store.run(getRosterInfo, jid)

    def fullNames(self, jids: list[str]) -> Deferred[dict[str, str | None]]:
        """
        See L{getFullNames}.
        """
        return self._store.run(getFullNames, jids)

    def setFullName(self, jid: str, fullname: str) -> Deferred[None]:
        """
        See L{setFullName}.
        """
        return self._store.run(setFullName, jid, fullname)

    def groupMembers(self, keys: list[str]) -> Deferred[dict[str, tuple[str, ...] | None]]:
        """
        See L{getGroupMembers}.
        """
        return self._store.run(getGroupMembers, keys)

    def setGroupMembers(self, key: str, members: list[str]) -> Deferred[None]:
        """
        See L{setGroupMembers}.
        """
        return self._store.run(setGroupMembers, key, members)

    def removeGroupMember(self, key: str, jid: str) -> Deferred[None]:
        """
        See L{removeGroupMember}.
        """
        return self._store.run(removeGroupMember, key, jid)

    def setSynced(
        self, jid: str, groups: list[str], responsehash: str, now: float
    ) -> Deferred[None]:
        """
        See L{setSynced}.
        """
        return self._store.run(setSynced, jid, groups, responsehash, now)
