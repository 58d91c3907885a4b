"""``make bench-load``: fastedge side by side with nginx, HAProxy and aiohttp under wrk.

Entry point: ``python -m bench.load.run --help``. See :mod:`bench.load.run` for the method.
"""
