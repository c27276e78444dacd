"""Teams on one fleet: API keys, their limits, fair shares and the usage ledger.

`keys.py` and `limits.py` decide (sans-I/O); `store.py` keeps keys and the ledger in SQLite or
PostgreSQL; `ledger.py` writes the ledger in batches off the request path; `access.py` is what
the gateway asks on each request; `commands.py` is `parallama keys` and `parallama usage`.
"""
