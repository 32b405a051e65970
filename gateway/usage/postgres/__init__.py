"""The usage ledger of record on PostgreSQL (``[usage] database_url``): its schema and migrations
(``schema``), the idempotent batch write with its daily totals (``write``), the durable queue on a
Redis Stream (``stream``) and its consumer (``consumer``), the ledger the request path records into
(``ledger``) with its record queue and shipping (``shipping``) and its reads (``reads``), the reports
(``reports``) and the one-log-line-per-change health (``health``).

psycopg is imported by these modules: import them only when a database URL is configured.
"""
