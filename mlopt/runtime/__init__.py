"""The runtime that executes a program: plan, state, update pipeline and services.

- :mod:`mlopt.runtime.plan`: the frozen :class:`~mlopt.runtime.plan.Plan` compiled from the graph
  and the configs (the only reader of config fields and method flags).
- :mod:`mlopt.runtime.state`: one :class:`~mlopt.runtime.state.ProblemState` per problem and a
  :class:`~mlopt.runtime.state.RunState`, each with ``state_dict()`` / ``load_state_dict()``.
- :mod:`mlopt.runtime.data`: a problem's resumable data stream.
- :mod:`mlopt.runtime.executor`: runs updates and unroll windows over those objects.

See ``docs/architecture.md`` for the whole picture.
"""
