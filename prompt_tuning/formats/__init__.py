"""Files in and out: run-folder storage (local or gs://), the one copy of the untrusted-file
readers, frozen checkpoints (HF, T5X legacy and orbax) and prompt files (npy, PEFT adapters)."""
