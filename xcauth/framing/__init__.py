"""
Wire framings: one module per protocol, each a thin Twisted receiver that turns
bytes into requests for the shared L{xcauth.core.authenticator.Authenticator} and its answers
back into bytes.  L{xcauth.framing.registry} maps framing names to factories.
"""
