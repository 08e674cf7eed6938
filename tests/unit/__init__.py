"""
Unit tests: no process is spawned; the reactor, clocks and transports are
Twisted's test doubles or in-process fakes.
"""
