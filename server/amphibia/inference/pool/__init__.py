"""The shared inference pool: workers (continuous batching), the wire protocol, the fair broker."""
