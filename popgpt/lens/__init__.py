"""The microscope: activations with TransformerLens names, ablation and patching, attention maps,
per-head metrics and induction heads, all batched over the population."""
