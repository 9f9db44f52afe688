"""Message brokers a tenant's events stream through: Redis Streams and NATS JetStream.

One small interface (``base``) with an adapter per broker; each tenant has its own stream
and, where the broker has per-user permissions, its own credential (``identity``).
"""
