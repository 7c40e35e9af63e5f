"""apilane's Kubernetes adapter: client, list-then-watch, leader election, Events."""
