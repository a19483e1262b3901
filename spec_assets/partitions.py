import dagster as dg

# One partition per source file, keyed by its stable shard id (file stem, e.g. `sharegpt-00003`).
corpus_shards = dg.DynamicPartitionsDefinition(name="corpus_shards")
