"""Celery workers: ``celery -A workers.app worker -Q cpu`` (and ``-Q gpu`` on CUDA hosts)."""
