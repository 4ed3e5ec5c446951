"""Step 3: run a plan: read, merge and write every tensor, streaming (:func:`merger.execute.executor.execute_plan`)."""
