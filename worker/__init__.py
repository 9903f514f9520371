"""GPU/CPU worker side: flash_attn shim, model loading, batched inference, the worker process."""
