"""Parallel layouts applied from outside the model: mesh, plans, communicator, planner."""
