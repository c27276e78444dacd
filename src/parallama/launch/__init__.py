"""`parallama up`: engine processes started, supervised and put behind the gateway."""
