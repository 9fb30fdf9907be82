"""The HTTP API of runs and agents: DRF views, their serializers, and the SSE event stream."""
