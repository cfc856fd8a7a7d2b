"""Step 5, load: the latent data set and the loader that feeds training (bucketed, resumable, prefetched)."""
