"""Data: build WebDataset shards (build.py), stream them as token batches (stream.py), resume exactly (cursor.py)."""
