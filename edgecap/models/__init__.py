"""PyTorch models (needs the ``train`` extra): the encoder, the decoders, checkpoints."""
