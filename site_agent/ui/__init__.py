"""The data steward's review page (`privdistill-site ui`): look at a shard, then approve or reject it."""
