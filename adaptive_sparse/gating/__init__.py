"""Gates, the significance they score, the rules that turn it into a selection at a held rate,
the scorers, selection before loading (the sampler) and packing selections into full batches."""
