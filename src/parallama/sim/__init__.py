"""The Ollama emulator: `parallama sim`."""
