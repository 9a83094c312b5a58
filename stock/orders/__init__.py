"""What the stock operations mean: the engine and its standalone and cluster paths."""
