"""HTTP adapters: Ray Serve (embeddings, events) and BentoML (downstream task inference)."""
