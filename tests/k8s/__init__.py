"""Validation of saescope's Kubernetes manifests, Prometheus rules and Grafana dashboard (k8s/)."""
