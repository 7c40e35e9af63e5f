"""Reusable test harness for real components: nats-server, kube-apiserver+etcd, the kernel."""
