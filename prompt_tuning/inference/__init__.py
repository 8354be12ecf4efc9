"""Decoding (greedy, sampling, beam, rank classification), SeqIO evaluation, and many prompts on
one frozen model (ensembles and mixed-task batches)."""
