"""Step 2: a config and the models' metadata -> a plan of tensor jobs (:func:`merger.plan.entry.plan_config`)."""
