"""Step 1, source: manifests and video folders, read, checked and cut into work units."""
