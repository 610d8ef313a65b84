"""Test support (no tests here): `support.models`, the tiny random-weight models of the tests and the benchmarks'
`--tiny` runs; `support.distributed`, `run_ranks` for multi-rank tests on gloo CPU processes.

Importable as `support` because tests/ is on sys.path (tests/conftest.py; the benchmarks insert it themselves).
"""
