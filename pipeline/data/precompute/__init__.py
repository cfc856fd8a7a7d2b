"""The precompute job: steps 1-4 as a Ray Data pipeline (config, planning, stages, the run)."""
