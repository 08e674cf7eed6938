"""
The state database (SQLite in a thread): its rows, the domain table, the
credential cache's storage and the roster sync's state.  Imports only
L{xcauth.interfaces} and the small top-level utilities.
"""
