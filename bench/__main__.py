"""
C{python -m bench}: see L{bench.run}.
"""

from bench.run import main

main()
