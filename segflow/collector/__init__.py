"""Segment-spec collector: the tracking API in front of segflow.events (issue 19)."""
