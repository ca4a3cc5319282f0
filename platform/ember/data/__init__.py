"""Data: corpus -> WebDataset shards (build.py) -> token batches (stream.py); exact resume (cursor.py)."""
