"""Serving: an embedding, ranking and search service with OpenAI's embeddings API (``cnclip serve``)."""
