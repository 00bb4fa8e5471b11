"""Customer attributes: identify traits and CRM exports, folded per customer (issue 19)."""
