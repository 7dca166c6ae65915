"""Benchmarks (not tests): each prints a table, writes JSON, and reports ratios measured side by side in one run,
interleaving the variants round by round so that a noisy, shared machine hurts them alike."""
