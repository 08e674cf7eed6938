"""
Test doubles that behave like xcauth's peers; used by the test suite, the demo
and the benchmark.
"""
