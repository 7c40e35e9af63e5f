"""apilane node-loader service."""
