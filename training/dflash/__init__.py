"""DFlash block draft: model, training objective and serving export (see DESIGN.md)."""
