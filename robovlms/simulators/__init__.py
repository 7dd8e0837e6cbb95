"""Code that runs next to a simulator, in the simulator's own Python environment: standard library and numpy only."""
