"""Checks of a bundle: against its runtime's model class (conformance), its structure, and its quality against the
source (weight error, encoder comparison); `verify` composes them."""
