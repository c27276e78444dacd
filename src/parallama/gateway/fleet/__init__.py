"""The backends as the gateway sees them: their connection pools, health and model probes, how
busy each engine says it is, and the models kept warm. The scheduler (`core`) decides with what
these learn."""
