"""firmware_adapters."""
