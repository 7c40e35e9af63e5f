"""Fixtures for real components live in apilane.testing (importable, tested);
this file only loads them. See README "Development" for the safety rules they enforce."""

pytest_plugins = [
    "apilane.testing.nats_fixtures",
    "apilane.testing.kube_fixtures",
    "apilane.testing.bpf_fixtures",
    "apilane.testing.otel_fixtures",
    "apilane.testing.docker_fixtures",
    "apilane.testing.chart_fixtures",
]
