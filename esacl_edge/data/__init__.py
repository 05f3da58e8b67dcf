"""Data: the chunk-stream format, data-set readers and stream building."""
