"""Steering: turning tags into decisions and decisions into actions.

- :mod:`bluesky_xsml.steering.policy`: rules, the pure :func:`~bluesky_xsml.steering.policy.decide`
  and the thread-safe :class:`~bluesky_xsml.steering.policy.PolicyEngine`.
- :mod:`bluesky_xsml.steering.plans`: an in-process plan that asks the policy between points.
- :mod:`bluesky_xsml.steering.queue`: a queue-server client that turns decisions into queue actions.

Nothing is imported here, so ``import bluesky_xsml.steering`` stays light.
"""
