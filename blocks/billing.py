"""The price-plan block: what tenants on a plan pay, kept on the Prefect server.

A tenant is on the plan its profile's ``price-plan`` label names (``standard`` when it
has none); ``setlist billing plan set NAME FILE`` creates or changes a plan. Without a
``standard`` block the standard plan is the platform's list prices.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from setlist.billing.pricing import PricePlan


class PricePlanBlock(Block):
    """A price plan: unit rates (Decimal), currency, monthly allowances and minimum, discounts."""

    _block_type_name = "Setlist Price Plan"
    _block_type_slug = "setlist-price-plan"
    _description = "Unit rates, currency, included allowances, minimum charge and discounts."

    plan: PricePlan = Field(default_factory=PricePlan)
