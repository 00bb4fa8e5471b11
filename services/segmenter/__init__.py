"""segflow segmenter service."""
