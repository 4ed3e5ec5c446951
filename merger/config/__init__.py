"""Step 1: a config's text -> a validated config (mergekit's schemas, the parsing limits, model references)."""
