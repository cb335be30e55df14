"""Model anatomy: find a model's parts from its config and load only the span or head a process needs."""
