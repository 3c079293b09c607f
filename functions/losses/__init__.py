"""Self-supervised losses as pure functions, and the queues they read."""
