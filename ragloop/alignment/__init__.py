"""alignment layer (see ARCHITECTURE.md)."""
