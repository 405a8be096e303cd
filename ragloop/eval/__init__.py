"""eval layer (see ARCHITECTURE.md)."""
