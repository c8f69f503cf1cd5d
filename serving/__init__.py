"""The FastAPI inference server and the runtime backends it serves from."""
