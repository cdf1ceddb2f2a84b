"""Data: sources (Fashion-MNIST, image folders, synthetic), scenarios and WebDataset shards."""
