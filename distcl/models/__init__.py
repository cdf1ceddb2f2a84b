"""Models: backbones, classifier heads (linear, cosine, fixed d-simplex), the embedding model."""
