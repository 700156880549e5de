"""The training data pipeline: shards -> samples -> batches, as small named stages. Imports no model code."""
