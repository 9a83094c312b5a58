"""Talking to Redis: the client, the auto-pipelines, the scripts and their replies."""
