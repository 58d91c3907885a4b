"""Upstream side of the proxy: connection pools and target selection."""
