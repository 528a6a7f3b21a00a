"""klein-worker runtime: configuration, boot, the queue consumer, transfers, results."""
