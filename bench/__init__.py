"""The benchmark beside nginx (issue 6): ``python -m bench.run`` (``make bench``) and ``bench.profile``.

Pure parts (wrk and ``/proc`` parsing, tables, targets, profile summaries) are plain functions tested
in ``tests/test_bench.py``; the rest starts real nginx, wrk, the OTLP sink and the proxies.
"""
