"""
Tests for the shared roster sync (L{xcauth.roster.sync}, L{xcauth.state.roster}) with a
fake ejabberd behind the command runner, a fetcher the tests answer, the real
SQLite state on a synchronous worker and a L{task.Clock}.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from xcauth.backends.jsxc import parseSharedRoster as parseJSXCRoster
from xcauth.core.authenticator import Authenticator
from xcauth.core.passwordkeys import PasswordKeys
from xcauth.core.tokens import makeToken
from xcauth.interfaces import (
    BackendUnavailable,
    Command,
    CommandFailed,
    DomainSettings,
    ICommandRunner,
    RosterEntry,
)
from xcauth.roster.sync import (
    RETRY_DELAYS,
    EjabberdctlRunner,
    HTTPCommandRunner,
    RosterSync,
    backendFetcher,
    cleanGroupName,
    describeSync,
    groupId,
    ignoredGroup,
    rosterHash,
    splitJID,
)
from xcauth.state.database import Store, connect
from xcauth.state.roster import RosterState, forgetRoster, getGroupMembers, getRosterInfo
from xcauth.testing.workers import SynchronousWorker

TEAM = groupId("Tem A")
DOMAIN = "example.org"


def entry(name: str, *groups: str) -> RosterEntry:
    return RosterEntry(name=name, groups=tuple(groups))


@implementer(ICommandRunner)
class FakeEjabberd:
    """
    A command runner keeping shared roster groups and vCard full names the way
    ejabberd 23.01 does (or, with C{nodeprep}, 24.12, tried by hand on
    Debian 13's ejabberd: a new group's id goes through nodeprep, lower case
    and no spaces, while its displayed groups are stored as given and must
    exist; adding a member to a group that displays a missing group fails),
    recording every command.  C{failures[name]} is a list of L{CommandFailed}
    raised by the next calls of that command; C{hold} makes every command wait
    for the test (L{release}).
    """

    def __init__(self, nodeprep: bool = False) -> None:
        self.nodeprep = nodeprep
        self.commands: list[str] = []
        self.groups: dict[tuple[str, str], dict[str, Any]] = {}
        self.fullnames: dict[str, str] = {}
        self.failures: dict[str, list[CommandFailed]] = {}
        self.hold = False
        self.held: list[tuple[Command, Deferred[list[str]]]] = []

    def run(self, command: Command) -> Deferred[list[str]]:
        self.commands.append(str(command))
        if self.hold:
            d: Deferred[list[str]] = Deferred()
            self.held.append((command, d))
            return d
        return self._answer(command)

    def release(self) -> None:
        held, self.held = self.held, []
        for command, d in held:
            self._answer(command).chainDeferred(d)

    def _answer(self, command: Command) -> Deferred[list[str]]:
        pending = self.failures.get(command.name)
        if pending:
            return fail(pending.pop(0))
        a = dict(command.args)
        if command.name == "srg_create" and self.nodeprep:
            # Only srg_create passes the id through nodeprep; the other
            # commands look the id up as given.
            a["group"] = a["group"].lower()
            if any(c in a["group"] for c in ' "&\'/:<>@'):
                return fail(CommandFailed(
                    "srg_create", "exit status 1",
                    "** exception error: {error,invalid_group_name}"))
            if (a["display"].lower() != a["group"]
                    and (a["display"], a["host"]) not in self.groups):
                return fail(CommandFailed("srg_create", "exit status 1",
                                          "Error: {wrong_displayed_groups}"))
        if command.name == "srg_get_info":
            info = self.groups.get((a["group"], a["host"]))
            return succeed([] if info is None else
                           [f"label\t{info['label']}", f"displayed_groups\t{info['display']}"])
        if command.name == "srg_user_add" and self.nodeprep:
            info = self.groups.get((a["group"], a["grouphost"]))
            if info is not None and (info["display"], a["grouphost"]) not in self.groups:
                return fail(CommandFailed("srg_user_add", "exit status 1",
                                          "** exception error: no function clause"))
        if command.name == "set_vcard":
            self.fullnames[f"{a['user']}@{a['host']}"] = a["content"]
            return succeed([])
        if command.name == "srg_create":
            self.groups.setdefault((a["group"], a["host"]), {"members": set()}).update(
                label=a["label"], display=a["display"]
            )
            return succeed([])
        if command.name == "srg_list":
            return succeed(sorted(g for g, h in self.groups if h == a["host"]))
        group = self.groups.get((a.get("group", ""), a.get("grouphost", a.get("host", ""))))
        if command.name == "srg_get_members":
            return succeed(sorted(group["members"]) if group else [])
        if command.name == "srg_user_add":
            if group is None:  # 23.01 adds to a group it does not have
                group = self.groups.setdefault((a["group"], a["grouphost"]), {"members": set()})
            group["members"].add(f"{a['user']}@{a['host']}")
            return succeed([])
        if command.name == "srg_user_del":
            if group is not None:
                group["members"].discard(f"{a['user']}@{a['host']}")
            return succeed([])
        return fail(CommandFailed(command.name, "exit status 1", "unknown command"))

    def close(self) -> Deferred[None]:
        return succeed(None)

    def members(self, group: str) -> set[str]:
        return set(self.groups[(group, DOMAIN)]["members"])


class Backend:
    """
    The roster fetcher: answers from C{rosters} at once, or, with C{manual},
    waits for the test (C{pending}).
    """

    def __init__(self) -> None:
        self.rosters: dict[str, dict[str, RosterEntry]] = {}
        self.requests: list[tuple[str, str]] = []
        self.manual = False
        self.pending: list[tuple[str, Deferred[dict[str, RosterEntry]]]] = []
        self.unavailable = 0
        self.cancelled: list[str] = []

    def fetch(self, user: str, domain: str) -> Deferred[dict[str, RosterEntry]]:
        self.requests.append((user, domain))
        if self.manual:
            d: Deferred[dict[str, RosterEntry]] = Deferred(
                lambda d: self.cancelled.append(user)
            )
            self.pending.append((user, d))
            return d
        if self.unavailable:
            self.unavailable -= 1
            return fail(BackendUnavailable("HTTP 502"))
        return succeed(dict(self.rosters.get(user, {})))

    def answer(self, index: int = 0) -> None:
        user, d = self.pending.pop(index)
        d.callback(dict(self.rosters.get(user, {})))


class SyncTestMixin:
    """
    A L{RosterSync} over L{FakeEjabberd}, L{Backend}, a temporary database and
    a clock.
    """

    def setUp(self) -> None:
        self.path = os.path.join(os.path.abspath(self.mktemp()))  # type: ignore[attr-defined]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.store = Store(self.path, SynchronousWorker())
        self.ejabberd = FakeEjabberd()
        self.backend = Backend()
        self.clock = Clock()
        self.sync = self.makeSync()

    def makeSync(self, **kw: Any) -> RosterSync:
        return RosterSync(
            self.backend.fetch, self.ejabberd, RosterState(self.store), self.clock, **kw
        )

    def db(self) -> sqlite3.Connection:
        return connect(self.path)

    def syncOnce(self, user: str = "alice") -> list[str]:
        before = len(self.ejabberd.commands)
        report = self.successResultOf(self.sync.sync(user, DOMAIN))  # type: ignore[attr-defined]
        self.assertEqual(report.commands, self.ejabberd.commands[before:])  # type: ignore[attr-defined]
        return report.commands


class PureFunctionTests(SynchronousTestCase):
    """
    Parsing, cleaning, hashing.
    """

    def test_parseJSXC(self) -> None:
        answer = {
            "result": "success",
            "data": {
                "sharedRoster": {
                    "alice": {"name": "Alice A", "groups": ["g1", "g2"]},
                    "bob": {"name": "Bob", "groups": []},
                    "bad": "not an object",
                    "noname": {"groups": ["g1", 7]},
                }
            },
        }
        self.assertEqual(
            parseJSXCRoster(answer),
            {
                "alice": entry("Alice A", "g1", "g2"),
                "bob": entry("Bob"),
                "noname": entry("", "g1"),
            },
        )

    def test_parseEmptyIsAList(self) -> None:
        """
        PHP encodes an empty roster as C{[]}.
        """
        self.assertEqual(
            parseJSXCRoster({"result": "success", "data": {"sharedRoster": []}}), {}
        )

    def test_parseErrors(self) -> None:
        for answer in (
            None,
            [],
            {"result": "error", "data": {"msg": "User not found."}},
            {"result": "success", "data": {"sharedRoster": "x"}},
            {"result": "success", "data": "x"},
        ):
            self.assertRaises(BackendUnavailable, parseJSXCRoster, answer)

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=5),
            lambda children: st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=8), children, max_size=3),
            max_leaves=12,
        )
    )
    def test_parseAnything(self, answer: Any) -> None:
        """
        Any JSON value parses to entries or fails with L{BackendUnavailable},
        also inside a success answer.
        """
        for value in (answer, {"result": "success", "data": {"sharedRoster": answer}}):
            try:
                parsed = parseJSXCRoster(value)
            except BackendUnavailable:
                continue
            for user, e in parsed.items():
                self.assertIsInstance(user, str)
                self.assertIsInstance(e.name, str)
                self.assertTrue(all(isinstance(g, str) for g in e.groups))

    def test_clean(self) -> None:
        self.assertEqual(cleanGroupName("Team A"), "Team A")
        self.assertEqual(cleanGroupName("a@b"), "ab")
        self.assertEqual(cleanGroupName("x\x00\x07\ty\u200d\u2028z"), "xyz")
        self.assertEqual(cleanGroupName("Ärzte & Co. (№1) €"), "Ärzte & Co. (№1) €")
        self.assertTrue(ignoredGroup("Hidden\u200b"))
        self.assertFalse(ignoredGroup("Hid\u200bden"))

    @given(st.text())
    def test_cleanAnything(self, name: str) -> None:
        import unicodedata

        clean = cleanGroupName(name)
        self.assertNotIn("@", clean)
        for c in clean:
            category = unicodedata.category(c)
            self.assertTrue(category[0] in "LNPS" or category == "Zs", (c, category))
        self.assertEqual(cleanGroupName(clean), clean)

    def test_hashOrder(self) -> None:
        a = {"alice": entry("A", "g1"), "bob": entry("B", "g1")}
        b = {"bob": entry("B", "g1"), "alice": entry("A", "g1")}
        self.assertEqual(rosterHash(a), rosterHash(b))
        self.assertNotEqual(rosterHash(a), rosterHash({"alice": entry("A", "g2")}))
        self.assertEqual(len(rosterHash({})), 64)

    def test_splitJID(self) -> None:
        self.assertEqual(splitJID("Bob", DOMAIN), ("bob", DOMAIN))
        self.assertEqual(splitJID("bob@Other.org", DOMAIN), ("bob", "other.org"))

    def test_commandText(self) -> None:
        command = Command("set_vcard", (("user", "alice"), ("host", DOMAIN),
                                        ("name", "FN"), ("content", "Alice A")))
        self.assertEqual(str(command), 'set_vcard alice example.org FN "Alice A"')
        self.assertEqual(command.argv(), ["set_vcard", "alice", DOMAIN, "FN", "Alice A"])


class SyncTests(SyncTestMixin, SynchronousTestCase):
    """
    What one sync does.
    """

    def test_firstLogin(self) -> None:
        """
        The first sync of alice runs the original's commands in its order.
        """
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        self.assertEqual(
            self.syncOnce(),
            [
                'set_vcard alice example.org FN "Alice A"',
                "srg_list example.org",
                "srg_create g1 example.org g1 g1 g1",
                "srg_get_info g1 example.org",
                "srg_user_add alice example.org g1 example.org",
                "srg_get_members g1 example.org",
            ],
        )
        self.assertEqual(self.ejabberd.members("g1"), {"alice@example.org"})
        info = getRosterInfo(self.db(), "alice@example.org")
        assert info is not None
        self.assertEqual(info.fullname, "Alice A")
        self.assertEqual(info.groups, ("g1",))
        self.assertEqual(info.responsehash, rosterHash(self.backend.rosters["alice"]))
        self.assertEqual(
            getGroupMembers(self.db(), ["g1@example.org"]),
            {"g1@example.org": ("alice@example.org",)},
        )

    def test_unchanged(self) -> None:
        """
        An unchanged answer costs one backend request and no command.
        """
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        self.syncOnce()
        report = self.successResultOf(self.sync.sync("alice", DOMAIN))
        self.assertFalse(report.changed)
        self.assertEqual(report.commands, [])
        self.assertEqual(len(self.backend.requests), 2)
        self.assertEqual(len(self.ejabberd.commands), 6)

    def test_membersSeeEachOther(self) -> None:
        """
        Bob's first sync after alice's: names and group known, one srg_list.
        """
        roster = {"alice": entry("Alice A", "g1"), "bob": entry("Bob B", "g1")}
        self.backend.rosters["alice"] = roster
        self.backend.rosters["bob"] = roster
        self.syncOnce("alice")
        self.assertEqual(self.ejabberd.members("g1"), {"alice@example.org", "bob@example.org"})
        self.assertEqual(self.ejabberd.fullnames["bob@example.org"], "Bob B")
        self.assertEqual(self.syncOnce("bob"), ["srg_list example.org"])
        info = getRosterInfo(self.db(), "bob@example.org")
        assert info is not None
        self.assertEqual(info.groups, ("g1",))

    def test_existingMembersLearned(self) -> None:
        """
        A group created before (by another program) is asked for its members:
        those already in it are not added again.
        """
        self.ejabberd.groups[("g1", DOMAIN)] = {"members": {"bob@example.org"}}
        self.backend.rosters["alice"] = {
            "alice": entry("", "g1"), "bob": entry("", "g1")
        }
        self.assertEqual(
            self.syncOnce(),
            [
                "srg_list example.org",
                "srg_get_members g1 example.org",
                "srg_user_add alice example.org g1 example.org",
                "srg_get_members g1 example.org",
            ],
        )

    def test_removedMember(self) -> None:
        """
        A stored member no longer listed is deleted from the group.
        """
        self.backend.rosters["alice"] = {
            "alice": entry("Alice A", "g1"), "bob": entry("Bob B", "g1")
        }
        self.syncOnce()
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        self.assertEqual(
            self.syncOnce(),
            ["srg_list example.org", "srg_user_del bob example.org g1 example.org"],
        )
        self.assertEqual(self.ejabberd.members("g1"), {"alice@example.org"})

    def test_leftGroup(self) -> None:
        """
        The login user is deleted from a group it has left, and the group's
        stored members no longer hold it (so that joining again adds it).
        """
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1", "g2")}
        self.syncOnce()
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g2")}
        self.assertEqual(
            self.syncOnce(),
            ["srg_list example.org", "srg_user_del alice example.org g1 example.org"],
        )
        self.assertEqual(self.ejabberd.members("g1"), set())
        self.assertEqual(getGroupMembers(self.db(), ["g1@example.org"])["g1@example.org"], ())
        info = getRosterInfo(self.db(), "alice@example.org")
        assert info is not None
        self.assertEqual(info.groups, ("g2",))
        # Back in g1: added again.
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1", "g2")}
        self.assertIn("srg_user_add alice example.org g1 example.org", self.syncOnce())
        self.assertEqual(self.ejabberd.members("g1"), {"alice@example.org"})

    def test_noGroupsLeft(self) -> None:
        """
        An empty roster (C{[]} from JSXC) removes the user from every group.
        """
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        self.syncOnce()
        self.backend.rosters["alice"] = {}
        self.assertEqual(self.syncOnce(), ["srg_user_del alice example.org g1 example.org"])

    def test_fullNameChanged(self) -> None:
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        self.syncOnce()
        self.backend.rosters["alice"] = {"alice": entry("Alice B", "g1")}
        self.assertEqual(
            self.syncOnce(), ['set_vcard alice example.org FN "Alice B"', "srg_list example.org"]
        )

    def test_groupIds(self) -> None:
        """
        A clean name that is lower-case ASCII is its own id; any other gets a
        lower-case readable part and a hash, different for names that differ
        only in case.
        """
        self.assertEqual(groupId("team-1.a_b"), "team-1.a_b")
        self.assertEqual(groupId("Tem A"), TEAM)
        self.assertRegex(groupId("G1"), r"^g1-[0-9a-f]{12}$")
        self.assertNotEqual(groupId("G1"), groupId("g1"))
        self.assertNotEqual(groupId("G1"), groupId("G 1"))
        self.assertRegex(groupId("Ärzte & Co"), r"^rzte-co-[0-9a-f]{12}$")
        self.assertRegex(groupId("ÄÖ"), r"^group-[0-9a-f]{12}$")
        self.assertLessEqual(len(groupId("x" * 500 + "X")), 53)

    def test_ejabberd2412(self) -> None:
        """
        With ejabberd 24.12, which lower-cases a new group's id and refuses
        spaces in it, groups of any name are made and their members shown:
        the ids are kept as given, the names are the labels.
        """
        self.ejabberd = FakeEjabberd(nodeprep=True)
        self.sync = self.makeSync()
        self.backend.rosters["alice"] = {
            "alice": entry("Alice A", "G1", "Team A"), "bob": entry("Bob B", "G1")
        }
        self.syncOnce()
        g1, team = groupId("G1"), groupId("Team A")
        self.assertEqual(self.ejabberd.members(g1), {"alice@example.org", "bob@example.org"})
        self.assertEqual(self.ejabberd.members(team), {"alice@example.org"})
        self.assertEqual(self.ejabberd.groups[(g1, DOMAIN)]["label"], "G1")
        self.assertEqual(self.ejabberd.groups[(team, DOMAIN)]["display"], team)
        info = getRosterInfo(self.db(), "alice@example.org")
        assert info is not None
        self.assertEqual(set(info.groups), {g1, team})
        self.assertIsNotNone(info.responsehash)

    def test_groupNotShownFails(self) -> None:
        """
        A group that ejabberd does not show after srg_create (it changed the
        id) fails the sync, and the answer's hash is not stored.
        """
        self.backend.rosters["alice"] = {"alice": entry("", "g1")}
        answer = self.ejabberd._answer

        def renaming(command: Command) -> Deferred[list[str]]:
            if command.name == "srg_create":
                args = dict(command.args)
                args["group"] = "other"
                command = Command(command.name, tuple(args.items()))
            return answer(command)

        self.ejabberd._answer = renaming  # type: ignore[method-assign]
        f = self.failureResultOf(self.sync.sync("alice", DOMAIN), CommandFailed)
        self.assertEqual(
            str(f.value),
            "srg_create failed with not applied: "
            "ejabberd shows no group g1 of example.org after creating it",
        )
        info = getRosterInfo(self.db(), "alice@example.org")
        self.assertTrue(info is None or info.responsehash is None)

    def test_membersNotShownFail(self) -> None:
        """
        Members that ejabberd does not show after srg_user_add fail the sync.
        """
        self.backend.rosters["alice"] = {"alice": entry("", "g1"), "bob": entry("", "g1")}
        answer = self.ejabberd._answer

        def dropping(command: Command) -> Deferred[list[str]]:
            if command.name == "srg_user_add" and dict(command.args)["user"] == "bob":
                return succeed([])
            return answer(command)

        self.ejabberd._answer = dropping  # type: ignore[method-assign]
        f = self.failureResultOf(self.sync.sync("alice", DOMAIN), CommandFailed)
        self.assertIn("srg_user_add failed with not applied", str(f.value))
        self.assertIn("bob@example.org", str(f.value))

    def test_olderGroupIdKept(self) -> None:
        """
        A group that an older version made with the name as its id (ejabberd
        23.01 keeps it) is found whatever its case and used as it is.
        """
        self.ejabberd.groups[("G1", DOMAIN)] = {"members": {"bob@example.org"}}
        self.backend.rosters["alice"] = {"alice": entry("", "G1"), "bob": entry("", "G1")}
        self.assertEqual(
            self.syncOnce(),
            [
                "srg_list example.org",
                "srg_get_members G1 example.org",
                "srg_user_add alice example.org G1 example.org",
                "srg_get_members G1 example.org",
            ],
        )
        self.assertEqual(set(self.ejabberd.groups), {("G1", DOMAIN)})

    def test_cleaningAndZeroWidthSpace(self) -> None:
        """
        Group names are cleaned; a group ending in U+200B, or one with nothing
        left after cleaning, is left out.
        """
        self.backend.rosters["alice"] = {
            "alice": entry("", "Te@m\x07 A\u200d", "Secret\u200b", "\x00@")
        }
        self.assertEqual(
            self.syncOnce(),
            [
                "srg_list example.org",
                f'srg_create {TEAM} example.org "Tem A" "Tem A" {TEAM}',
                f"srg_get_info {TEAM} example.org",
                f"srg_user_add alice example.org {TEAM} example.org",
                f"srg_get_members {TEAM} example.org",
            ],
        )
        self.assertEqual(set(self.ejabberd.groups), {(TEAM, DOMAIN)})

    def test_groupDeletedInEjabberd(self) -> None:
        """
        A known group that ejabberd no longer has is created again at the next
        changed sync, with all its members.
        """
        self.backend.rosters["alice"] = {"alice": entry("A", "g1")}
        self.syncOnce()
        del self.ejabberd.groups[("g1", DOMAIN)]
        self.backend.rosters["alice"] = {"alice": entry("A", "g1"), "bob": entry("B", "g1")}
        self.assertEqual(
            self.syncOnce(),
            [
                'set_vcard bob example.org FN B',
                "srg_list example.org",
                "srg_create g1 example.org g1 g1 g1",
                "srg_get_info g1 example.org",
                "srg_user_add alice example.org g1 example.org",
                "srg_user_add bob example.org g1 example.org",
                "srg_get_members g1 example.org",
            ],
        )

    def test_otherDomainAndCase(self) -> None:
        """
        Nextcloud user names are lowercased as XMPP node names; a name with a
        domain keeps it.
        """
        backend = object()
        self.sync = self.makeSync(tenantOf={DOMAIN: backend, "other.org": backend}.get)
        self.backend.rosters["alice"] = {
            "Alice": entry("", "g1"), "carol@other.org": entry("", "g1")
        }
        self.syncOnce()
        self.assertEqual(
            self.ejabberd.members("g1"), {"alice@example.org", "carol@other.org"}
        )
        info = getRosterInfo(self.db(), "alice@example.org")
        assert info is not None
        self.assertEqual(info.groups, ("g1",))

    def test_refresh(self) -> None:
        """
        C{xcauth roster refresh} (L{forgetRoster}) makes the next sync run its
        commands again, learning the members from ejabberd.
        """
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        self.syncOnce()
        self.assertEqual(forgetRoster(self.db(), "alice@example.org"), 1)
        self.assertEqual(
            self.syncOnce(),
            [
                'set_vcard alice example.org FN "Alice A"',
                "srg_list example.org",
                "srg_get_members g1 example.org",
            ],
        )
        self.assertEqual(forgetRoster(self.db(), "nobody@example.org"), 0)
        self.assertEqual(forgetRoster(self.db()), 1)
        self.assertEqual(len(self.syncOnce()), 3)

    def test_oldDatabase(self) -> None:
        """
        Rows written by the original (a group list, members, an extra column)
        are used as they are.
        """
        conn = sqlite3.connect(self.path)
        conn.executescript(
            "CREATE TABLE rosterinfo (jid TEXT PRIMARY KEY, fullname TEXT, grouplist TEXT,"
            " responsehash TEXT, last_update TIMESTAMP DEFAULT CURRENT_TIMESTAMP,"
            " mine TEXT);"
            "CREATE TABLE rostergroups (groupname TEXT PRIMARY KEY, userlist TEXT);"
            "INSERT INTO rosterinfo (jid, fullname, grouplist, responsehash, mine) VALUES"
            " ('alice@example.org', 'Alice A', 'g1\tOld', 'abc', 'keep');"
            "INSERT INTO rostergroups VALUES ('g1@example.org', 'alice@example.org');"
        )
        conn.commit()
        conn.close()
        self.ejabberd.groups[("g1", DOMAIN)] = {"members": {"alice@example.org"}}
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        self.assertEqual(
            self.syncOnce(),
            ["srg_list example.org", "srg_user_del alice example.org Old example.org"],
        )
        row = self.db().execute("SELECT mine FROM rosterinfo").fetchone()
        self.assertEqual(row[0], "keep")

    def test_failedCommandKeepsHash(self) -> None:
        """
        A failed command fails the sync with L{CommandFailed}; the answer's hash
        is not stored, so the next sync runs what is left.
        """
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        self.ejabberd.failures["srg_user_add"] = [
            CommandFailed("srg_user_add", "exit status 1", "Error: no")
        ]
        f = self.failureResultOf(self.sync.sync("alice", DOMAIN), CommandFailed)
        self.assertEqual(str(f.value), "srg_user_add failed with exit status 1: Error: no")
        info = getRosterInfo(self.db(), "alice@example.org")
        assert info is not None
        self.assertIsNone(info.responsehash)
        # The full name was set, the group made: not again.
        self.assertEqual(
            self.syncOnce(),
            [
                "srg_list example.org",
                "srg_get_members g1 example.org",
                "srg_user_add alice example.org g1 example.org",
                "srg_get_members g1 example.org",
            ],
        )

    def test_describe(self) -> None:
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        text = self.successResultOf(Deferred.fromCoroutine(
            describeSync(self.sync, "alice", DOMAIN)))
        self.assertIn("synced with 6 commands", text)
        self.assertIn("  srg_create g1 example.org g1 g1 g1", text)
        text = self.successResultOf(Deferred.fromCoroutine(
            describeSync(self.sync, "alice", DOMAIN)))
        self.assertIn("unchanged", text)
        self.backend.unavailable = 1
        with capturedLogs() as events:
            self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(
                describeSync(self.sync, "alice", DOMAIN))))
        self.assertIn("HTTP 502", events[-1]["reason"])


class SchedulingTests(SyncTestMixin, SynchronousTestCase):
    """
    When syncs run: after the answer, coalesced, bounded, retried, stopped.
    """

    def test_afterTheAnswer(self) -> None:
        """
        A login's answer is there before its sync starts, and does not wait for
        it.
        """
        secret = b"s3cret"
        auth = Authenticator(
            lambda domain: DomainSettings((secret,), None, None),  # type: ignore[arg-type]
            self.clock,
            PasswordKeys(),
            onLogin=self.sync.onLogin,
        )
        self.backend.manual = True
        token = makeToken(secret, "alice", DOMAIN, 1000)
        self.assertIs(self.successResultOf(auth.authenticate("alice", DOMAIN, token)), True)
        self.assertEqual(self.backend.requests, [])
        self.clock.advance(0)
        self.assertEqual(self.backend.requests, [("alice", DOMAIN)])
        # The next login is answered while that sync waits for the backend.
        self.assertIs(self.successResultOf(auth.authenticate("alice", DOMAIN, token)), True)
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 1)

    def test_oneSyncAcrossNodes(self) -> None:
        """
        Two nodes sharing the state database: while node A syncs a user,
        node B's login of that user starts no sync of its own; once A is
        done, B's next login syncs.
        """
        nodeB = RosterSync(self.backend.fetch, self.ejabberd, RosterState(self.store),
                           self.clock)
        self.backend.manual = True
        self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(self.backend.requests, [("alice", DOMAIN)])
        nodeB.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(self.backend.requests, [("alice", DOMAIN)])
        self.assertEqual(nodeB.pending(), 0)
        self.backend.answer()
        self.clock.advance(0)
        self.assertEqual(self.sync.pending(), 0)
        nodeB.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 2)

    def test_failedLoginNoSync(self) -> None:
        auth = Authenticator(
            lambda domain: DomainSettings((b"s",), None, _NoBackend()),  # type: ignore[arg-type]
            self.clock,
            PasswordKeys(),
            onLogin=self.sync.onLogin,
        )
        self.assertIs(self.successResultOf(auth.authenticate("alice", DOMAIN, "wrong")), False)
        self.clock.advance(0)
        self.assertEqual(self.backend.requests, [])

    def test_hookFailureLogged(self) -> None:
        def broken(user: str, domain: str) -> None:
            raise RuntimeError("boom")

        auth = Authenticator(
            lambda domain: DomainSettings((b"s",), None, None),  # type: ignore[arg-type]
            self.clock,
            PasswordKeys(),
            onLogin=broken,
        )
        token = makeToken(b"s", "alice", DOMAIN, 1000)
        self.assertIs(self.successResultOf(auth.authenticate("alice", DOMAIN, token)), True)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_coalesced(self) -> None:
        """
        A burst of logins of one user while its sync runs gives one follow-up
        sync, not one per login.
        """
        self.backend.manual = True
        self.backend.rosters["alice"] = {"alice": entry("A", "g1")}
        self.sync.onLogin("alice", DOMAIN)
        self.sync.onLogin("alice", DOMAIN)  # queued: nothing more
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 1)
        for _ in range(10):
            self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 1)
        self.backend.answer()
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 2)
        self.backend.answer()
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 2)
        self.assertEqual(self.sync.pending(), 0)
        # The follow-up saw the same roster: commands of the first sync only.
        self.assertEqual(len(self.ejabberd.commands), 6)

    def test_otherUsersNotCoalesced(self) -> None:
        self.backend.manual = True
        self.sync.onLogin("alice", DOMAIN)
        self.sync.onLogin("bob", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(sorted(u for u, _ in self.backend.requests), ["alice", "bob"])

    def test_bounded(self) -> None:
        """
        At most C{maxConcurrent} syncs run at once; the others wait their turn.
        """
        self.sync = self.makeSync(maxConcurrent=2)
        self.backend.manual = True
        for user in ("u1", "u2", "u3"):
            self.sync.onLogin(user, DOMAIN)
        self.clock.advance(0)
        self.assertEqual([u for u, _ in self.backend.requests], ["u1", "u2"])
        self.backend.answer(0)
        self.clock.advance(0)
        self.assertEqual([u for u, _ in self.backend.requests], ["u1", "u2", "u3"])

    def test_retryWithBackoff(self) -> None:
        """
        A failed sync is logged with the command and its status and tried again
        after each delay of C{RETRY_DELAYS}, and not before.
        """
        self.backend.rosters["alice"] = {"alice": entry("A", "g1")}
        self.ejabberd.failures["srg_create"] = [
            CommandFailed("srg_create", "exit status 3", "Failed RPC connection"),
            CommandFailed("srg_create", "timeout", "killed after 10 s"),
        ]
        with capturedLogs() as events:
            self.sync.onLogin("alice", DOMAIN)
            self.clock.advance(0)
            self.assertEqual(len(self.backend.requests), 1)
            self.clock.advance(RETRY_DELAYS[0] - 0.5)
            self.assertEqual(len(self.backend.requests), 1)
            self.clock.advance(0.5)
            self.assertEqual(len(self.backend.requests), 2)
            self.clock.advance(RETRY_DELAYS[1] - 0.5)
            self.assertEqual(len(self.backend.requests), 2)
            self.clock.advance(0.5)
            self.assertEqual(len(self.backend.requests), 3)
        self.assertEqual(self.ejabberd.members("g1"), {"alice@example.org"})
        warnings = [e for e in events if "failed" in e.get("log_format", "")]
        self.assertEqual(
            [e["reason"] for e in warnings],
            [
                "srg_create failed with exit status 3: Failed RPC connection",
                "srg_create failed with timeout: killed after 10 s",
            ],
        )
        self.assertEqual([e["delay"] for e in warnings], list(RETRY_DELAYS[:2]))
        self.assertEqual(self.sync.pending(), 0)
        self.clock.advance(max(RETRY_DELAYS) * 2)
        self.assertEqual(len(self.backend.requests), 3)

    def test_loginBringsRetryForward(self) -> None:
        """
        A login while the user's sync waits for a retry (minutes away) starts
        the sync at once instead; the retry that was scheduled does not run
        again afterwards.
        """
        self.backend.rosters["alice"] = {"alice": entry("A", "g1")}
        self.ejabberd.failures["srg_create"] = [
            CommandFailed("srg_create", "exit status 3", "Failed RPC connection"),
        ]
        self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 1)
        self.assertEqual(self.sync.pending(), 1)
        self.clock.advance(1)
        self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 2)
        self.assertEqual(self.ejabberd.members("g1"), {"alice@example.org"})
        self.assertEqual(self.sync.pending(), 0)
        self.clock.advance(max(RETRY_DELAYS) * 2)
        self.assertEqual(len(self.backend.requests), 2)

    def test_backendUnavailableRetried(self) -> None:
        self.backend.unavailable = 1
        self.backend.rosters["alice"] = {"alice": entry("A", "g1")}
        self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(self.ejabberd.commands, [])
        self.clock.advance(RETRY_DELAYS[0])
        self.assertEqual(len(self.ejabberd.commands), 6)

    def test_givenUp(self) -> None:
        """
        After the last retry the sync is given up until the next login.
        """
        self.sync = self.makeSync(retryDelays=(1.0, 2.0))
        self.backend.unavailable = 10
        with capturedLogs() as events:
            self.sync.onLogin("alice", DOMAIN)
            self.clock.advance(0)
            self.clock.advance(1)
            self.clock.advance(2)
            self.clock.advance(100)
        self.assertEqual(len(self.backend.requests), 3)
        self.assertEqual(self.sync.pending(), 0)
        self.assertIn("given up", events[-1]["log_format"])
        self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 4)

    def test_loginDuringFailingSync(self) -> None:
        """
        A login while a sync runs that then fails tries again at once.
        """
        self.backend.manual = True
        self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.sync.onLogin("alice", DOMAIN)
        user, d = self.backend.pending.pop()
        d.errback(BackendUnavailable("down"))
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 2)

    def test_stopWaits(self) -> None:
        """
        Stopping waits for a sync in flight, and for no queued one.
        """
        self.backend.rosters["alice"] = {"alice": entry("A", "g1")}
        self.ejabberd.hold = True
        self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(len(self.ejabberd.held), 1)
        self.sync.onLogin("bob", DOMAIN)  # queued, dropped by stop
        stopped = self.sync.stop()
        self.assertNoResult(stopped)
        self.ejabberd.hold = False
        self.ejabberd.release()
        self.successResultOf(stopped)
        self.clock.advance(1)
        self.assertEqual([u for u, _ in self.backend.requests], ["alice"])
        self.sync.onLogin("carol", DOMAIN)
        self.clock.advance(0)
        self.assertEqual(len(self.backend.requests), 1)

    def test_stopDropsWaiting(self) -> None:
        """
        A sync waiting for a free slot when the daemon stops never starts.
        """
        self.sync = self.makeSync(maxConcurrent=1)
        self.backend.rosters["alice"] = {"alice": entry("A", "g1")}
        self.ejabberd.hold = True
        self.sync.onLogin("alice", DOMAIN)
        self.sync.onLogin("bob", DOMAIN)
        self.clock.advance(0)
        self.assertEqual([u for u, _ in self.backend.requests], ["alice"])
        stopped = self.sync.stop()
        self.ejabberd.hold = False
        self.ejabberd.release()
        self.successResultOf(stopped)
        self.clock.advance(1)
        self.assertEqual([u for u, _ in self.backend.requests], ["alice"])
        self.assertEqual(self.sync.pending(), 0)

    def test_stopBounded(self) -> None:
        """
        A sync that does not finish within the stop timeout is cancelled.
        """
        self.sync = self.makeSync(stopTimeout=5.0)
        self.backend.manual = True
        self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        stopped = self.sync.stop()
        self.clock.advance(4.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(self.backend.cancelled, ["alice"])
        self.assertEqual(self.sync.pending(), 0)

    def test_stopCancelsRetries(self) -> None:
        self.backend.unavailable = 1
        self.sync.onLogin("alice", DOMAIN)
        self.clock.advance(0)
        self.successResultOf(self.sync.stop())
        self.clock.advance(max(RETRY_DELAYS))
        self.assertEqual(len(self.backend.requests), 1)


class _NoBackend:
    def auth(self, user: str, domain: str, password: str) -> Deferred[Any]:
        from xcauth.interfaces import Outcome

        return succeed(Outcome.NO)


class FetcherTests(SynchronousTestCase):
    """
    L{backendFetcher} asks the domain's backend client, under the domain the
    backend knows.
    """

    def fetch(self, answer: Any) -> Deferred[dict[str, RosterEntry]]:
        calls = []

        class Client:
            def sharedRoster(self, user: str, domain: str) -> Deferred[Any]:
                calls.append((user, domain))
                if isinstance(answer, Exception):
                    return fail(answer)
                return succeed(answer)

        fetch = backendFetcher(lambda domain: DomainSettings((b"s",), "cloud.org", Client()))  # type: ignore[arg-type]
        d = fetch("alice", DOMAIN)
        self.assertEqual(calls, [("alice", "cloud.org")])
        return d

    def test_contract(self) -> None:
        roster = {"bob": entry("Bob", "g1")}
        self.assertEqual(self.successResultOf(self.fetch(roster)), roster)

    def test_unavailable(self) -> None:
        self.failureResultOf(self.fetch(BackendUnavailable("down")), BackendUnavailable)


class _FakeProcess:
    def __init__(self) -> None:
        self.signals: list[Any] = []
        self.stdinClosed = False
        self.lost = False

    def loseConnection(self) -> None:
        self.lost = True

    def signalProcess(self, sig: Any) -> None:
        self.signals.append(sig)

    def closeStdin(self) -> None:
        self.stdinClosed = True


class _ProcessReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str], dict[str, str]]] = []
        self.process = _FakeProcess()

    def spawnProcess(self, protocol: Any, executable: str, args: list[str],
                     env: dict[str, str], **kw: Any) -> _FakeProcess:
        self.spawned.append((protocol, executable, args, env))
        protocol.makeConnection(self.process)
        return self.process


class EjabberdctlRunnerTests(SynchronousTestCase):
    """
    L{EjabberdctlRunner}: argv without a shell, exit status, time limit.
    """

    def setUp(self) -> None:
        self.reactor = _ProcessReactor()
        self.runner = EjabberdctlRunner(self.reactor, "/usr/sbin/ejabberdctl", 10.0, {"A": "b"})
        self.command = Command("srg_get_members", (("group", "G 1;rm"), ("host", DOMAIN)))

    def end(self, output: bytes, reason: Exception) -> None:
        protocol = self.reactor.spawned[0][0]
        protocol.outReceived(output)
        protocol.processEnded(Failure(reason))

    def test_success(self) -> None:
        d = self.runner.run(self.command)
        _, executable, args, env = self.reactor.spawned[0]
        self.assertEqual(executable, "/usr/sbin/ejabberdctl")
        self.assertEqual(args, ["/usr/sbin/ejabberdctl", "srg_get_members", "G 1;rm", DOMAIN])
        self.assertEqual(env, {"A": "b"})
        self.assertTrue(self.reactor.process.stdinClosed)
        self.end(b"alice@example.org\n\xffbob@example.org\n\n", ProcessDone(0))
        self.assertEqual(
            self.successResultOf(d), ["alice@example.org", "\ufffdbob@example.org"]
        )
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_exitStatus(self) -> None:
        d = self.runner.run(self.command)
        self.end(b"\nError: {module_not_loaded,mod_shared_roster}\nmore\n",
                 ProcessTerminated(exitCode=1))
        f = self.failureResultOf(d, CommandFailed)
        self.assertEqual(f.value.command, "srg_get_members")
        self.assertEqual(f.value.status, "exit status 1")
        self.assertEqual(f.value.message, "Error: {module_not_loaded,mod_shared_roster}")

    def test_timeout(self) -> None:
        d = self.runner.run(self.command)
        self.reactor.advance(9.9)
        self.assertEqual(self.reactor.process.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.reactor.process.signals, [signal.SIGKILL])
        self.assertTrue(self.reactor.process.lost)
        # Failed at once, even if the pipes stay open (children of a wrapper).
        f = self.failureResultOf(d, CommandFailed)
        self.assertEqual((f.value.status, f.value.message), ("timeout", "killed after 10 s"))
        self.end(b"", ProcessTerminated(signal=9))

    def test_cancel(self) -> None:
        """
        Cancelling a command (a stopping daemon) kills its process.
        """
        d = self.runner.run(self.command)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.reactor.process.signals, [signal.SIGKILL])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.end(b"", ProcessTerminated(signal=9))

    def test_notStarted(self) -> None:
        class Broken(_ProcessReactor):
            def spawnProcess(self, *a: Any, **kw: Any) -> _FakeProcess:
                raise OSError(2, "No such file or directory")

        runner = EjabberdctlRunner(Broken(), "/nonexistent", 10.0)
        f = self.failureResultOf(runner.run(self.command), CommandFailed)
        self.assertEqual(f.value.status, "not started")

    def test_outputBounded(self) -> None:
        from xcauth.roster import sync as roster
        d = self.runner.run(self.command)
        protocol = self.reactor.spawned[0][0]
        for _ in range(3):
            protocol.outReceived(b"x" * roster.MAX_OUTPUT)
        protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(len(self.successResultOf(d)[0]), roster.MAX_OUTPUT)


class EjabberdctlProcessTests(TestCase):
    """
    L{EjabberdctlRunner} with real processes: a stand-in C{ejabberdctl} script.
    """

    def script(self, body: str) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "ejabberdctl")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body + "\n")
        os.chmod(path, 0o755)
        return path

    async def test_arguments(self) -> None:
        from twisted.internet import reactor

        runner = EjabberdctlRunner(reactor, self.script('printf "%s\\n" "$@"'), 20.0)
        lines = await runner.run(Command("set_vcard", (("u", "a b"), ("c", "$(x);*"))))
        self.assertEqual(lines, ["set_vcard", "a b", "$(x);*"])
        await runner.close()

    async def test_failure(self) -> None:
        from twisted.internet import reactor

        runner = EjabberdctlRunner(
            reactor, self.script("printf 'Error: \\377 no\\n' >&2; exit 3"), 20.0
        )
        with self.assertRaises(CommandFailed) as e:
            await runner.run(Command("srg_list", ()))
        self.assertEqual((e.exception.status, e.exception.message),
                         ("exit status 3", "Error: \ufffd no"))
        await runner.close()

    async def test_timeoutKills(self) -> None:
        """
        A command still running at its time limit is killed and fails.
        """
        from twisted.internet import reactor

        runner = EjabberdctlRunner(reactor, self.script("exec sleep 60"), 0.5)
        started = time.monotonic()
        with self.assertRaises(CommandFailed) as e:
            await runner.run(Command("srg_list", ()))
        self.assertEqual(e.exception.status, "timeout")
        await runner.close()
        self.assertLess(time.monotonic() - started, 30)

    async def test_timeoutWrapperChild(self) -> None:
        """
        A wrapper whose child keeps the output pipe open (for 5 s) does not
        hold the failure back until the child is done.
        """
        from twisted.internet import reactor

        runner = EjabberdctlRunner(reactor, self.script("(sleep 5) & exec sleep 60"), 0.5)
        started = time.monotonic()
        with self.assertRaises(CommandFailed):
            await runner.run(Command("srg_list", ()))
        self.assertLess(time.monotonic() - started, 4.5)
        await runner.close()


class _API(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, Any]] = []
        self.answers: dict[bytes, tuple[int, bytes]] = {}

    def render_POST(self, request: Any) -> bytes:
        body = json.loads(request.content.read())
        self.requests.append((request.path, body))
        code, answer = self.answers.get(request.path, (200, b"0"))
        request.setResponseCode(code)
        return answer


class _Hanging:
    """
    An HTTP client whose requests never get an answer; C{canceller} says how a
    cancelled one fails.
    """

    def __init__(self, canceller: Any) -> None:
        self.canceller = canceller

    def post(self, *a: Any, **kw: Any) -> Deferred[Any]:
        return Deferred(self.canceller)


class HTTPCommandRunnerTests(SynchronousTestCase):
    """
    L{HTTPCommandRunner}: JSON by argument name, ejabberd's answers.
    """

    def setUp(self) -> None:
        from treq.testing import StubTreq

        self.api = _API()
        self.clock = Clock()
        self.runner = HTTPCommandRunner(
            StubTreq(self.api), "http://127.0.0.1:5281/api/", self.clock, 10.0
        )

    def test_rescode(self) -> None:
        command = Command("srg_create", (("group", "g1"), ("host", DOMAIN), ("label", "g1"),
                                         ("description", "g1"), ("display", "g1")))
        self.assertEqual(self.successResultOf(self.runner.run(command)), [])
        self.assertEqual(
            self.api.requests,
            [(b"/api/srg_create", {"group": "g1", "host": DOMAIN, "label": "g1",
                                   "description": "g1", "display": ["g1"]})],
        )

    def test_list(self) -> None:
        self.api.answers[b"/api/srg_get_members"] = (200, b'["alice@example.org"]')
        command = Command("srg_get_members", (("group", "g1"), ("host", DOMAIN)))
        self.assertEqual(self.successResultOf(self.runner.run(command)), ["alice@example.org"])

    def test_errors(self) -> None:
        command = Command("srg_user_add", (("user", "a"),))
        for code, answer, status, message in (
            (200, b"1", "HTTP 200", "unexpected answer 1"),
            (500, b'"internal_error"', "HTTP 500", "internal_error"),
            (404, b'{"status":"error","code":40,"message":"Endpoint not found."}',
             "HTTP 404", "Endpoint not found."),
            (401, b"<html>", "HTTP 401", "<html>"),
        ):
            self.api.answers[b"/api/srg_user_add"] = (code, answer)
            f = self.failureResultOf(self.runner.run(command), CommandFailed)
            self.assertEqual((f.value.status, f.value.message), (status, message))

    def test_timeout(self) -> None:
        """
        A request without an answer in time is cancelled: a timeout, whether
        the client reports the cancellation as such or (as the Agent does) as
        a response never received because of it.
        """
        from twisted.internet.defer import CancelledError
        from twisted.web._newclient import ResponseNeverReceived

        for cancelled in (
            lambda d: d.errback(CancelledError()),
            lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])),
        ):
            runner = HTTPCommandRunner(
                _Hanging(cancelled), "http://127.0.0.1:1/api", self.clock, 3.0
            )
            d = runner.run(Command("srg_list", (("host", DOMAIN),)))
            self.clock.advance(2.9)
            self.assertNoResult(d)
            self.clock.advance(0.1)
            f = self.failureResultOf(d, CommandFailed)
            self.assertEqual((f.value.status, f.value.message),
                             ("timeout", "no answer within 3 s"))

    def test_refused(self) -> None:
        class Refusing:
            def post(self, *a: Any, **kw: Any) -> Deferred[Any]:
                return fail(ConnectionRefusedError())

        runner = HTTPCommandRunner(Refusing(), "http://127.0.0.1:1/api", self.clock, 3.0)
        f = self.failureResultOf(runner.run(Command("srg_list", ())), CommandFailed)
        self.assertEqual(f.value.status, "no connection")
        self.assertIn("ConnectionRefusedError", f.value.message)


class ConfigTests(SynchronousTestCase):
    """
    The roster options.
    """

    def parse(self, *extra: str) -> Any:
        from xcauth.daemon.config import ConfigOptions

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        options = ConfigOptions()
        options.parseOptions(["--url", "http://c/x", "--secret", "s",
                              "--db", os.path.join(directory, "x.sqlite3"), *extra])
        return options.config

    def test_default(self) -> None:
        self.assertEqual(self.parse().rosterSync, "none")

    def test_http(self) -> None:
        config = self.parse("--roster-api-url", "http://127.0.0.1:5281/api",
                            "--roster-command-timeout", "3")
        self.assertEqual((config.rosterSync, config.rosterApiURL, config.rosterCommandTimeout),
                         ("http", "http://127.0.0.1:5281/api", 3.0))

    def test_errors(self) -> None:
        from twisted.python.usage import UsageError

        for args, message in (
            (["--roster-sync", "http"], "needs roster-api-url"),
            (["--roster-sync", "ejabberdctl"], "needs ejabberdctl=PATH"),
            (["--roster-sync", "yes"], "not valid"),
            (["--ejabberdctl", "/nonexistent"], "not an executable"),
            (["--ejabberdctl", "/bin/true", "--roster-api-url", "http://a/api"], "choose one"),
            (["--roster-api-url", "ftp://a/api"], "roster-api-url"),
        ):
            with self.assertRaises(UsageError) as e:
                self.parse(*args)
            self.assertIn(message, str(e.exception))


class AdminTests(SyncTestMixin, SynchronousTestCase):
    """
    C{xcauth roster refresh}.
    """

    def run_(self, *args: str) -> tuple[int, str]:
        import contextlib
        import io

        from xcauth.cli.main import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                main(["--db", self.path, *args])
            except SystemExit as e:
                status = int(e.code or 0)
        return status, out.getvalue()

    def test_refresh(self) -> None:
        self.backend.rosters["alice"] = {"alice": entry("Alice A", "g1")}
        self.syncOnce()
        status, out = self.run_("roster", "refresh", "alice@example.org")
        self.assertEqual(status, 0, out)
        self.assertIn("forgot the roster sync state of alice@example.org", out)
        self.assertEqual(len(self.syncOnce()), 3)
        self.assertEqual(self.run_("roster", "refresh", "bob@example.org")[0], 1)
        status, out = self.run_("roster", "refresh")
        self.assertEqual((status, "1 JIDs" in out), (0, True))
        self.assertEqual(self.run_("roster", "refresh", "nojid")[0], 2)
        self.assertEqual(self.run_("roster")[0], 2)



class ArgvRecorder(FakeEjabberd):
    """
    L{FakeEjabberd} that refuses, as C{spawnProcess} does, an argument with a
    NUL (C{ValueError}) or over 128 KiB (C{OSError} E2BIG).
    """

    def run(self, command: Command) -> Deferred[list[str]]:
        for arg in command.argv():
            if "\0" in arg:
                raise ValueError("embedded null byte")
            if len(arg.encode("utf-8")) > 128 * 1024:
                raise OSError(7, "Argument list too long")
        return super().run(command)


class TenantAndArgumentTests(SyncTestMixin, SynchronousTestCase):
    """
    A sync writes only into its own tenant, and one bad name does not fail
    the sync of the others.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ejabberd = ArgvRecorder()
        self.sync = self.makeSync(tenantOf={DOMAIN: "ours", "victim.example": "theirs"}.get)

    def test_otherTenantLeftOut(self) -> None:
        self.backend.rosters["alice"] = {
            "ceo@victim.example": entry("Fake CEO", "g1"),
            "ceo@unserved.example": entry("Fake CEO", "g1"),
            "bob": entry("Bob", "g1"),
        }
        with capturedLogs() as events:
            commands = self.syncOnce()
        self.assertFalse([c for c in commands if "victim" in c or "unserved" in c], commands)
        self.assertIn("set_vcard bob example.org FN Bob", commands)
        self.assertEqual(self.ejabberd.members("g1"), {"bob@example.org"})
        self.assertEqual(len([e for e in events if "left out" in e["log_format"]]), 1)

    def test_nulInNameOthersSynced(self) -> None:
        self.backend.rosters["alice"] = {
            "bob": entry("B\0b", "g1"),
            "carol": entry("Carol", "g1"),
            "d\0ve": entry("Dave", "g1"),
            "erin": entry("E" * 200_000, "g1"),
        }
        with capturedLogs():
            commands = self.syncOnce()
        self.assertEqual(self.ejabberd.fullnames["carol@example.org"], "Carol")
        self.assertEqual(self.ejabberd.fullnames["bob@example.org"], "B b")
        self.assertEqual(self.ejabberd.fullnames["erin@example.org"], "E" * 1024)
        self.assertEqual(self.ejabberd.members("g1"),
                         {"bob@example.org", "carol@example.org", "erin@example.org"})
        self.assertFalse([c for c in commands if "\0" in c])

    def test_runnerExceptionIsFailedCommand(self) -> None:
        """
        Whatever a runner raises is a L{CommandFailed}: logged as a failed
        sync with a retry, never a traceback.
        """
        def broken(command: Command) -> Deferred[list[str]]:
            raise RuntimeError("broken runner")

        self.ejabberd.run = broken  # type: ignore[method-assign]
        self.backend.rosters["alice"] = {"bob": entry("Bob", "G1")}
        failure = self.failureResultOf(self.sync.sync("alice", DOMAIN), CommandFailed)
        self.assertIn("RuntimeError", str(failure.value))
