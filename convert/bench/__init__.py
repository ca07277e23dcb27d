"""Benchmarks: `fmtconv bench` (speed against copy, the usual pipeline and mlx_lm.convert), its synthetic
checkpoints and phases, and the encoders' SQNR bench."""
