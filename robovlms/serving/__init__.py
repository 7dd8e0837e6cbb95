"""Serving a trained policy: to the simulator workers of an evaluation, and to robots.

    batched_policy.py     BatchedPolicy: many episodes stepped in one forward pass, each with its own memory
    batch_invariance.py   why an episode's actions do not depend on the episodes batched with it, on the CPU
    evaluation_server.py  the evaluation's policy server: one process holds the policy, simulator workers ask it
    websocket_server.py   `robovlms serve RUN_DIR`: the policy over a websocket, one connection per robot
    messages.py           the websocket's message format (msgpack, openpi's numpy encoding)
    client.py             PolicyClient: a robot's side of `robovlms serve`

Nothing here is imported by `import robovlms.serving`: a simulator worker or a robot imports only what it needs,
without torch.
"""
