"""Prefect flows: recipes of `pipeline` calls. Importing this package turns Prefect's telemetry off (offline)."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
