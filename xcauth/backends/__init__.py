"""
The backends: HTTP on Twisted's Agent, the JSXC app's signed API, a stock
Nextcloud's OCS API and the watch on its brute-force throttle.  Imports only
L{xcauth.interfaces} and the small top-level utilities.
"""
