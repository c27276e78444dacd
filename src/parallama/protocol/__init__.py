"""Wire formats of the APIs parallama speaks: Ollama's native API and the OpenAI dialect."""
