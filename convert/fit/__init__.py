"""Allocation to a size budget from measured sensitivity (`--fit SIZE`, `--target-bpw X`)."""
