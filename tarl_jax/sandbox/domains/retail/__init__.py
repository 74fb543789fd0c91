"""Retail: users, orders, products (tau-bench v1 tools; tau2 variants in `tau2`)."""
import functools

from tarl_jax.sandbox.domains import (DomainSpec, WRITE_TOOLS, calculate, field, think,
                                      transfer_to_human_agents)
from tarl_jax.sandbox.domains.retail import tau2, tools as t
from tarl_jax.sandbox.domains.retail.schemas import SCHEMAS

TABLES = {
    "users": {"email_lower": field("email", lower=True),
              "first_name_lower": field("name", "first_name", lower=True)},
    "orders": {"user_id": field("user_id"), "status": field("status")},
    "products": {"name": field("name")},
}

V1 = DomainSpec(
    name="retail", flavor="v1", tables=TABLES, schemas=SCHEMAS,
    write_tools=WRITE_TOOLS["retail"],
    tools={fn.__name__: fn for fn in [
        calculate, t.cancel_pending_order, t.exchange_delivered_order_items,
        t.find_user_id_by_email, t.find_user_id_by_name_zip, t.get_order_details,
        t.get_product_details, t.get_user_details, t.list_all_product_types,
        t.modify_pending_order_address, t.modify_pending_order_items,
        t.modify_pending_order_payment, t.modify_user_address, t.return_delivered_order_items,
        think, transfer_to_human_agents]})

# tau2 ships no tools.json: its schemas come from docstrings. We offer the v1 schemas of the
# tools both share (same arguments) and our own for the one tau2 added.
_GET_ITEM_DETAILS = {"type": "function", "function": {
    "name": "get_item_details",
    "description": "Get the inventory details of an item (one variant of a product).",
    "parameters": {"type": "object", "properties": {"item_id": {
        "type": "string", "description": "The item id, such as '6086499569'. Be careful the "
                                         "item id is different from the product id."}},
                   "required": ["item_id"]}}}
_V1_SCHEMAS = {s["function"]["name"]: s for s in SCHEMAS}

TAU2 = DomainSpec(
    name="retail", flavor="tau2", tables=TABLES, write_tools=WRITE_TOOLS["retail"],
    tools={fn.__name__: fn for fn in tau2.TOOLS},
    schemas=[_V1_SCHEMAS.get(fn.__name__, _GET_ITEM_DETAILS) for fn in tau2.TOOLS],
    unknown_tool="Error: Tool '{name}' not found.",
    normalize={table: functools.partial(tau2.MODELS.build, model)
               for table, model in tau2.TABLE_MODELS.items()})
