"""What if: replay a recorded run's routing under a cost model, with the engine's own scheduler."""
