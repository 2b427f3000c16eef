"""The fleet side (DESIGN s11): verified ingest, database, queries, logbook, anchoring."""
