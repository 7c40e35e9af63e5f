"""apilane common library (no service imports this package's siblings)."""
