"""The usage ledger of record on PostgreSQL (``[usage] database_url``): its schema and migrations
(``schema``), the idempotent batch write (``write``), the durable queue on a Redis Stream
(``stream``), the ledger the request path records into (``ledger``) and the reports (``reports``).

psycopg is imported by these modules: import them only when a database URL is configured.
"""
