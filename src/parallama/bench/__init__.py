"""`parallama bench`: the load generator behind the seed's throughput table."""
