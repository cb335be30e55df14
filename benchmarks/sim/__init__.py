"""A discrete-event swarm simulator driving the shipped placement and routing (see benchmarks/simulate.py)."""
