"""Data: corpus -> WebDataset shards (build.py text, build_images.py images; inspect.py looks at them) ->
batches (reader.py one slot's samples, formats.py decodes, stream.py a rank's ShardStream, loader.py the spec's
`build_stream` with DataLoader workers); exact, elastic resume (cursor.py)."""
