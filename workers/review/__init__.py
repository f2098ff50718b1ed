"""The worker's side of operator review: keeping judged frames, applying review requests, the labelled folder."""
