"""tasks layer (see DESIGN.md, Layers)."""
