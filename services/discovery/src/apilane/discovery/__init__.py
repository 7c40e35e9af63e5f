"""apilane discovery service."""
