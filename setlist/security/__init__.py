"""Security and compliance checks of one tenant: Kubernetes posture, data privacy, config.

- ``checks.py``: the one table of checks (``CHECKS``), their controls, and ``Finding``;
- ``posture.py``, ``privacy.py``, ``platform_config.py``: the checks of each category;
- ``pod_security.py``: the Pod Security Standards "restricted" rules on a pod spec;
- ``redaction.py``: what a finding may say about a secret;
- ``scoring.py``: scores per framework and category; ``sarif.py``: the SARIF 2.1.0 log;
- ``sources.py``: what a scan reads about a tenant (rendered or live objects, data, config);
- ``report.py``: the scan's reports and events.

May import ``core``, ``k8s``, ``dispatch``, ``workers``, ``tenants`` and ``etl``; not
``ml``, ``backup``, ``billing`` or ``gateway`` (the same layer), nothing above them.
"""
