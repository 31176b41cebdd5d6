"""Data attribution: which training names taught the backdoor (TracIn, Gauss-Newton influence),
scored against the planted truth."""
