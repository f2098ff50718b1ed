"""Operator review: the review window of kept frames, review requests and their audit trail, the CLI."""
