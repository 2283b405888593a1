"""The engine: config, checkpoint loading, the decoder, experts, KV cache, generation."""
