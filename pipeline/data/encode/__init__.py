"""Step 3, encode: clips -> VAE latents, captions -> text embeddings, and the encoders' fingerprints."""
