"""Tenants: API keys, private adapters, quotas, fair shares, usage metering and the audit log.

`database` (SQLAlchemy engine + Alembic migrations), `models` (the schema), `keys` (generation and hashing),
`quotas` (limits and their defaults), `limiter` (rates and concurrency in this replica), `service` (every
operation on the database). HTTP authentication is `server.api.auth`; the command line is `server.cli`.
"""
