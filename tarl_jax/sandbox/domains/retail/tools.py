"""tau-bench v1 retail tools over the SQLite store (same checks, effects and strings).

Records are loaded as dicts, changed the way tau-bench changes its in-memory dicts (so key order
and float rounding come out the same), and written back with `data.put`.
"""
from __future__ import annotations

import json

from tarl_jax.sandbox.domains import text_or, tool


def _item_count_error(order: dict, item_ids, message) -> str | None:
    # Duplicates allowed: each listed id must occur at least as often in the order.
    all_item_ids = [item["item_id"] for item in order["items"]]
    for item_id in item_ids:
        if item_ids.count(item_id) > all_item_ids.count(item_id):
            return message(item_id)
    return None


@tool("CancelPendingOrder")
def cancel_pending_order(data, order_id, reason):
    order = data.get("orders", order_id)
    if order is None:
        return "Error: order not found"
    if order["status"] != "pending":
        return "Error: non-pending order cannot be cancelled"
    if reason not in ["no longer needed", "ordered by mistake"]:
        return "Error: invalid reason"

    refunds, user = [], None
    for payment in order["payment_history"]:
        payment_id = payment["payment_method_id"]
        refunds.append({"transaction_type": "refund", "amount": payment["amount"],
                        "payment_method_id": payment_id})
        if "gift_card" in payment_id:  # gift cards are refunded at once
            user = user or data.require("users", order["user_id"])
            method = user["payment_methods"][payment_id]
            method["balance"] += payment["amount"]
            method["balance"] = round(method["balance"], 2)

    order["status"] = "cancelled"
    order["cancel_reason"] = reason
    order["payment_history"].extend(refunds)
    data.put("orders", order_id, order)
    if user is not None:
        data.put("users", order["user_id"], user)
    return json.dumps(order)


def _price_difference(data, order, item_ids, new_item_ids):
    """(error, diff): the new variants must exist in the old items' products and be available."""
    diff = 0
    for item_id, new_item_id in zip(item_ids, new_item_ids):
        item = [item for item in order["items"] if item["item_id"] == item_id][0]
        variants = data.require("products", item["product_id"])["variants"]
        if not (new_item_id in variants and variants[new_item_id]["available"]):
            return f"Error: new item {new_item_id} not found or available", None
        diff += variants[new_item_id]["price"] - item["price"]
    return None, diff


@tool("ExchangeDeliveredOrderItems")
def exchange_delivered_order_items(data, order_id, item_ids, new_item_ids, payment_method_id):
    order = data.get("orders", order_id)
    if order is None:
        return "Error: order not found"
    if order["status"] != "delivered":
        return "Error: non-delivered order cannot be exchanged"
    error = _item_count_error(order, item_ids, lambda i: f"Error: {i} not found")
    if error:
        return error
    if len(item_ids) != len(new_item_ids):
        return "Error: the number of items to be exchanged should match"
    error, diff_price = _price_difference(data, order, item_ids, new_item_ids)
    if error:
        return error
    diff_price = round(diff_price, 2)

    methods = data.require("users", order["user_id"])["payment_methods"]
    if payment_method_id not in methods:
        return "Error: payment method not found"
    method = methods[payment_method_id]
    if method["source"] == "gift_card" and method["balance"] < diff_price:
        return "Error: insufficient gift card balance to pay for the price difference"

    order["status"] = "exchange requested"
    order["exchange_items"] = sorted(item_ids)
    order["exchange_new_items"] = sorted(new_item_ids)
    order["exchange_payment_method_id"] = payment_method_id
    order["exchange_price_difference"] = diff_price
    data.put("orders", order_id, order)
    return json.dumps(order)


@tool("FindUserIdByEmail")
def find_user_id_by_email(data, email):
    for user_id, _ in data.scan("users", email_lower=email.lower()):
        return user_id
    return "Error: user not found"


@tool("FindUserIdByNameZip")
def find_user_id_by_name_zip(data, first_name, last_name, zip):
    for user_id, profile in data.scan("users", first_name_lower=first_name.lower()):
        if (profile["name"]["last_name"].lower() == last_name.lower()
                and profile["address"]["zip"] == zip):
            return user_id
    return "Error: user not found"


@tool("GetOrderDetails")
def get_order_details(data, order_id):
    return text_or(data, "orders", order_id, "Error: order not found")


@tool("GetProductDetails")
def get_product_details(data, product_id):
    return text_or(data, "products", product_id, "Error: product not found")


@tool("GetUserDetails")
def get_user_details(data, user_id):
    return text_or(data, "users", user_id, "Error: user not found")


@tool("ListAllProductTypes")
def list_all_product_types(data):
    names = {product["name"]: product["product_id"] for _, product in data.scan("products")}
    return json.dumps(dict(sorted(names.items())))


def _address(address1, address2, city, state, country, zip):
    return {"address1": address1, "address2": address2, "city": city, "state": state,
            "country": country, "zip": zip}


@tool("ModifyPendingOrderAddress")
def modify_pending_order_address(data, order_id, address1, address2, city, state, country, zip):
    order = data.get("orders", order_id)
    if order is None:
        return "Error: order not found"
    if order["status"] != "pending":
        return "Error: non-pending order cannot be modified"
    order["address"] = _address(address1, address2, city, state, country, zip)
    data.put("orders", order_id, order)
    return json.dumps(order)


@tool("ModifyPendingOrderItems")
def modify_pending_order_items(data, order_id, item_ids, new_item_ids, payment_method_id):
    order = data.get("orders", order_id)
    if order is None:
        return "Error: order not found"
    if order["status"] != "pending":
        return "Error: non-pending order cannot be modified"
    error = _item_count_error(order, item_ids, lambda i: f"Error: {i} not found")
    if error:
        return error
    if len(item_ids) != len(new_item_ids):
        return "Error: the number of items to be exchanged should match"
    error, diff_price = _price_difference(data, order, item_ids, new_item_ids)
    if error:
        return error

    user = data.require("users", order["user_id"])
    if payment_method_id not in user["payment_methods"]:
        return "Error: payment method not found"
    method = user["payment_methods"][payment_method_id]
    if method["source"] == "gift_card" and method["balance"] < diff_price:
        return "Error: insufficient gift card balance to pay for the new item"

    order["payment_history"].append({
        "transaction_type": "payment" if diff_price > 0 else "refund",
        "amount": abs(diff_price), "payment_method_id": payment_method_id})
    if method["source"] == "gift_card":
        method["balance"] -= diff_price
        method["balance"] = round(method["balance"], 2)
        data.put("users", order["user_id"], user)

    for item_id, new_item_id in zip(item_ids, new_item_ids):
        item = [item for item in order["items"] if item["item_id"] == item_id][0]
        variant = data.require("products", item["product_id"])["variants"][new_item_id]
        item["item_id"] = new_item_id
        item["price"] = variant["price"]
        item["options"] = variant["options"]
    order["status"] = "pending (item modified)"
    data.put("orders", order_id, order)
    return json.dumps(order)


@tool("ModifyPendingOrderPayment")
def modify_pending_order_payment(data, order_id, payment_method_id):
    order = data.get("orders", order_id)
    if order is None:
        return "Error: order not found"
    if order["status"] != "pending":
        return "Error: non-pending order cannot be modified"
    user = data.require("users", order["user_id"])
    methods = user["payment_methods"]
    if payment_method_id not in methods:
        return "Error: payment method not found"
    history = order["payment_history"]
    if len(history) > 1 or history[0]["transaction_type"] != "payment":
        return "Error: there should be exactly one payment for a pending order"
    if history[0]["payment_method_id"] == payment_method_id:
        return "Error: the new payment method should be different from the current one"
    amount = history[0]["amount"]
    method = methods[payment_method_id]
    if method["source"] == "gift_card" and method["balance"] < amount:
        return "Error: insufficient gift card balance to pay for the order"

    old_id = history[0]["payment_method_id"]
    history.extend([
        {"transaction_type": "payment", "amount": amount, "payment_method_id": payment_method_id},
        {"transaction_type": "refund", "amount": amount, "payment_method_id": old_id}])
    if method["source"] == "gift_card":
        method["balance"] -= amount
        method["balance"] = round(method["balance"], 2)
    if "gift_card" in old_id:
        old = methods[old_id]
        old["balance"] += amount
        old["balance"] = round(old["balance"], 2)
    data.put("orders", order_id, order)
    data.put("users", order["user_id"], user)
    return json.dumps(order)


@tool("ModifyUserAddress")
def modify_user_address(data, user_id, address1, address2, city, state, country, zip):
    user = data.get("users", user_id)
    if user is None:
        return "Error: user not found"
    user["address"] = _address(address1, address2, city, state, country, zip)
    data.put("users", user_id, user)
    return json.dumps(user)


@tool("ReturnDeliveredOrderItems")
def return_delivered_order_items(data, order_id, item_ids, payment_method_id):
    order = data.get("orders", order_id)
    if order is None:
        return "Error: order not found"
    if order["status"] != "delivered":
        return "Error: non-delivered order cannot be returned"
    if payment_method_id not in data.require("users", order["user_id"])["payment_methods"]:
        return "Error: payment method not found"
    if ("gift_card" not in payment_method_id
            and payment_method_id != order["payment_history"][0]["payment_method_id"]):
        return ("Error: payment method should be either the original payment method or a "
                "gift card")
    error = _item_count_error(order, item_ids, lambda i: "Error: some item not found")
    if error:
        return error
    order["status"] = "return requested"
    order["return_items"] = sorted(item_ids)
    order["return_payment_method_id"] = payment_method_id
    data.put("orders", order_id, order)
    return json.dumps(order)
