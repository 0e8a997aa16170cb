"""``layerwise train``: settings, data, optimizer and schedule, checkpoints, the training loop."""
