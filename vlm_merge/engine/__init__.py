"""The streaming merge engine, backbone planning, resident (in-memory) merging and running a recipe."""
