"""
The rows of the brute-force budgets shared by several nodes
(L{xcauth.core.sharedbudget}): the C{budgetevents} table of schema version 3.
"""

from __future__ import annotations

from typing import Any

from xcauth.state.database import transaction


def exchangeEvents(
    conn: Any, node: str, events: list[tuple[str, str, float]], since: float,
    before: float,
) -> list[tuple[str, str, float]]:
    """
    Write C{node}'s C{events} (C{(kind, key, at)}: kind C{user} or
    C{backend}), forget every node's events older than C{before}, and return
    the other nodes' events since C{since}.  One transaction.
    """
    with transaction(conn):
        for kind, key, at in events:
            conn.execute(
                "INSERT INTO budgetevents (node, kind, key, at) VALUES (?, ?, ?, ?)",
                (node, kind, key, at),
            )
        conn.execute("DELETE FROM budgetevents WHERE at < ?", (before,))
        rows = conn.execute(
            "SELECT kind, key, at FROM budgetevents WHERE node <> ? AND at > ?"
            " ORDER BY at",
            (node, since),
        ).fetchall()
    return [(str(kind), str(key), float(at)) for kind, key, at in rows]
