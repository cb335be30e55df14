"""OpenAI-compatible HTTP gateway over the swarm (`uvicorn app.main:app`)."""
