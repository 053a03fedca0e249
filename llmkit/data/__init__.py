"""Data: packaged sources, text cleaning and mixtures, token shards and loaders."""
