"""Clusters: a local Ray head/worker with token auth (`ember up`/`down`) and the Ray Jobs client."""
