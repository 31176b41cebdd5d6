"""Cures: remove the backdoor from every member with a reversible, low-rank or sparse weight patch,
measured for leakage and KL on one frontier."""
