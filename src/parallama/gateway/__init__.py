"""The gateway: `parallama serve`."""
