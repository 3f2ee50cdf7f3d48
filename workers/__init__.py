"""qpipe workers: Celery app, tasks, CLI and local server helpers."""
