"""Provider adapters and provider health."""
