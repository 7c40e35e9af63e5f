"""Fixtures for real components live in apilane.shared.testing (importable, tested);
this file only loads them. See README "Development" for the safety rules they enforce."""

pytest_plugins = [
    "apilane.shared.testing.nats_fixtures",
    "apilane.shared.testing.kube_fixtures",
    "apilane.shared.testing.bpf_fixtures",
    "apilane.shared.testing.otel_fixtures",
]
