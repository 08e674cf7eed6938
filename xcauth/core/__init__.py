"""
The decision core: the authenticator, tokens, password keys, penalties, the
credential cache's decisions and bcrypt hashing.  Imports only
L{xcauth.interfaces} and the small top-level utilities.
"""
