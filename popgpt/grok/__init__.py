"""Grokking: a population learning a + b mod p with the shared trainer; when it clicks, and the
key frequencies it uses."""
