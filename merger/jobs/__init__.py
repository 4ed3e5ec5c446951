"""Jobs of the hosted app: records (:mod:`merger.jobs.store`), the queue (`queue`), the worker (`worker`) and its watchdog (`supervisor`)."""
