"""Versioned HTTP API (``/v1``)."""
