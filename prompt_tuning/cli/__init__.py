"""The command-line edge: T5X-style gin flags, gin parsing and checks, and how errors print."""
