"""Swarm client: route through peers, keep sessions, run the head locally and sample."""

from swarm.client.client import StepOutput, SwarmClient
from swarm.client.session import InferenceSession

__all__ = ["InferenceSession", "StepOutput", "SwarmClient"]
