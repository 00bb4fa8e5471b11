"""segflow scorer service."""
