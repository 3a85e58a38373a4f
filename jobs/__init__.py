"""jobs layer (see DESIGN.md, Layers)."""
