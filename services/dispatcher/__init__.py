"""segflow dispatcher service."""
