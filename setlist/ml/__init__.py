"""A tenant's recommender: training, models and checkpoints.

- ``recommender.py``: the pure pipeline, events to implicit feedback to ALS to rankings;
- ``als_solver.py``: implicit's ALS with its conjugate-gradient step on a CUDA device;
- ``model_registry.py``: the model registry and checkpoints in the tenant's storage;
- ``training.py``: the training steps, as tasks of the ``ml-training`` flow.

May import ``core``, ``k8s``, ``dispatch``, ``workers``, ``tenants`` and ``etl``; not
``backup``, ``billing``, ``security`` or ``gateway`` (the same layer), nothing above them.
"""
