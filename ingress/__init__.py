"""The HTTP edge: OpenAI-compatible routes, auth, the SSE relay, error mapping."""
