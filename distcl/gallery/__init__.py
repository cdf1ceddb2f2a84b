"""Gallery embeddings: the Parquet store (one part per model and rank) and faiss search."""
