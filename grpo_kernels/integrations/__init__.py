"""Small adapters to other training libraries (imported explicitly; nothing here is patched globally)."""
