"""Step 4, store: the output folder of precompute (shards, index, manifest.json, errors, text conditioning)."""
