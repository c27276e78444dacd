"""The model routes that run no generation: the listings over the fleet, `/api/show`, and model
management (pull, push, create, copy, delete, blobs) fanned out to every Ollama backend."""
