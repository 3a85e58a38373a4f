"""flows layer (see DESIGN.md, Layers)."""
