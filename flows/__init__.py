"""Orchestration: the Prefect flow over loop/'s stages, and the CLI that starts it, checks it (preflight.py),
supervises it (supervise.py) and shows it (console.py, round_table.py).

Importing this package sets two defaults for Prefect's temporary local server (the embedded default),
before Prefect itself is imported (it reads its settings once, at import); a user's own setting wins:
- no usage telemetry: it fails, and logs an error, on machines without internet access;
- 120 s, not 20, for the server to answer at start: its first start creates the database, and on a
  busy 2-core machine that took longer than 20 s (CI: "Timed out while attempting to connect to
  ephemeral Prefect API server").
"""
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
