"""Money in the JSON the ingress answers: a JSON number written with the exact decimal digits,
the same digits beside it as a string.

The seed product's SDKs (Go, Rust; /work/shared/SEED-API.md) decode `cost_usd` and
`total_cost_usd` as numbers and fail on a string. Inside the gateway money stays `Decimal`
and travels as a decimal string (the router's reply frames, usage events, the ledger's
`numeric`). This is the one place that writes it for a client: `usd_number` puts the decimal's
own digits into the document (an `orjson.Fragment`, so no binary float ever rounds them), and
every such number has its exact string beside it under `<name>_exact` for clients that want
to do arithmetic without floats. Used by `ingress/chat.py`, `ingress/embeddings.py` (the
response's `metadata`) and `ingress/usage.py` (`total_cost_usd`, `cost_usd`)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

EXACT = "_exact"  # the suffix of the exact string beside each money number
_MONEY = "cost_usd"  # a key that ends so holds US dollars: `cost_usd`, `total_cost_usd`


def usd_text(amount: Decimal) -> str:
    """Fixed-point digits, never an exponent, without trailing zeros: `6E-8` is written
    `0.00000006`, the ledger's `0.0001337500` `0.00013375`."""
    if not amount.is_finite():
        raise ValueError(f"not an amount of money: {amount}")
    text = format(amount, "f")  # exact: no rounding context is involved
    return text.rstrip("0").rstrip(".") if "." in text else text


def usd_number(amount: Decimal) -> orjson.Fragment:
    """`amount` as a JSON number with exactly its digits (a valid JSON number: an optional
    minus, digits, an optional fraction)."""
    return orjson.Fragment(usd_text(amount))


def usd_fields(name: str, amount: Decimal) -> dict[str, Any]:
    """`{name: <number>, name_exact: "<digits>"}`."""
    text = usd_text(amount)
    return {name: orjson.Fragment(text), name + EXACT: text}


def exact_costs(value: Any) -> Any:
    """Every `*cost_usd` decimal string in `value` (a response's metadata, its attempts, a
    council's members and judge), in place, as a JSON number with the same digits, the string
    kept beside it as `*cost_usd_exact`. A value already converted, or not a decimal, is left
    alone: nothing here can make a document invalid. Returns `value`."""
    if isinstance(value, dict):
        converted: list[tuple[str, str]] = []
        for key, item in value.items():
            if isinstance(item, str):
                if key.endswith(_MONEY):
                    converted.append((key, item))
            elif isinstance(item, dict | list):
                exact_costs(item)
        for key, text in converted:
            try:
                amount = Decimal(text)
                exact = usd_text(amount)
            except (InvalidOperation, ValueError):
                continue
            value[key] = orjson.Fragment(exact)
            value[key + EXACT] = exact
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list):
                exact_costs(item)
    return value
