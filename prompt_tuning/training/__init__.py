"""Training pieces: the objective (losses and normalisers), the prompt-only train step, the
optimizers with the trainable/frozen split, checkpoints, and the wayward regulariser."""
