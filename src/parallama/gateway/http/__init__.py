"""HTTP/1.1 on both sides of the gateway: the server its clients talk to (listening, parsing,
deadlines, limits, CORS) and the pooled client it talks to the backends with. Nothing here knows
of models: the layers above decide, these move bytes."""
