"""Step 2, decode: a video file -> uint8 clips of a bucket's shape (one pass over the file)."""
