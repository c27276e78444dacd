"""What the gateway tells of itself: Prometheus metrics, the live page and its feed, and OTLP
traces."""
