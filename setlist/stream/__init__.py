"""Real-time processing: the ``stream-ingest`` job's micro-batches from a tenant's broker
stream into its curated events table, exactly once, and the live analytics they feed.
"""
