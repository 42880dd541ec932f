"""Training: the recipe, the Trainer, batching, collation, packing, the loss, checkpoints,
sharding, attention, kernels, distributed launch and the memory plan."""
