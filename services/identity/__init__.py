"""segflow identity service."""
