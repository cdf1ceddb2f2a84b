"""distcl: compatible image-retrieval models over long continual-learning task sequences."""
