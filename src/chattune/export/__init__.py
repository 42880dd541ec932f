"""Export: a merged model folder, GGUF and an Ollama Modelfile, and the Jinja check."""
