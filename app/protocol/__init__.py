"""The OpenAI wire types: `requests` (what clients send, validated at the edge) and `responses` (bodies, stream
chunks and errors the gateway sends back, typed and serialized once)."""
