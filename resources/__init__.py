"""Dagster resources: the external systems the assets talk to (object store, target model, corpus)."""
