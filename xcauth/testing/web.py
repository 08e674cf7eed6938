"""
What the fake Nextclouds share about twisted.web requests.
"""

from __future__ import annotations

from twisted.web.server import Request


def whenGone(request: Request) -> list[bool]:
    """
    A list that gets C{True} once the client of C{request} has gone (its
    connection lost before the answer): the fakes send nothing then.
    """
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))
    return gone
