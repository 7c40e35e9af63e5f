"""apilane's operator command line, the `apilane` console script (see `main`)."""
