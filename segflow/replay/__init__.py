"""``segflow replay``: what-if over recorded history (see :mod:`segflow.replay.core`)."""
