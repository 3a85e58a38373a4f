"""jobs layer (see docs/design.md, "Layers and the import rule")."""
