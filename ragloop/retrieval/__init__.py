"""retrieval layer (see ARCHITECTURE.md)."""
