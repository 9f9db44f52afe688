"""Billing: exact money from exact usage, per tenant and period.

- ``pricing.py``: pure usage aggregation, price plans and invoice lines (``blocks`` loads
  it, so it imports ``core.tenancy`` only);
- ``metering.py``: a tenant's usage records for a UTC day;
- ``invoices.py``: day reports and month invoices, published atomically;
- ``operations.py``: the operators' billing commands;
- ``results.py``: what the ``billing-report`` flow returns.

May import ``core``, ``k8s``, ``dispatch``, ``workers``, ``tenants`` and ``etl``; not
``ml``, ``backup``, ``security`` or ``gateway`` (the same layer), nothing above them.
"""
