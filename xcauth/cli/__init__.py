"""
The xcauth command: a request on the command line or stdin, and the admin
subcommands (domains, cache, tokens).
"""
