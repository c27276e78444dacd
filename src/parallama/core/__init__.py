"""Sans-I/O core of the gateway: no sockets, no clocks of its own, deterministic tests."""
