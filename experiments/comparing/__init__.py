"""The parts of ``experiments/compare_rules.py``."""
