"""Model integrations: one module per transformers model family."""
