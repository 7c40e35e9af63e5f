"""apilane renderer service."""
