"""The three encoders around the DiT: wav2vec2 audio features, umT5 text states and the Wan2.1 VAE."""
