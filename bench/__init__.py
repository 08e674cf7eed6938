"""
The xcauth load benchmark (C{make bench}, C{python -m bench}).

It runs the real C{twistd xcauth} daemon and the fake Nextcloud on loopback,
drives them with closed-loop load generator processes speaking the real
framings, and prints one table row per scenario (a JSON copy goes to
C{results/}).  It is a benchmark, not a test: it asserts nothing.
"""
