"""Imported once by the fork server that every worker is forked from (spawner.py)."""

import gc

import mailerd.worker.session  # noqa: F401  (the point: imported before the forks)

gc.freeze()  # keep the imported objects out of every later collection: shared, not copied
