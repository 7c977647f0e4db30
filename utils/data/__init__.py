"""Data: datasets and their records, augmentation (CPU and GPU), loaders, sources, the sample set."""
