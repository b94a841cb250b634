"""Training (needs the ``train`` extra): datasets, feature cache, the training loop."""
