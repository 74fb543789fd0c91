"""tau2-bench retail tools: tau-bench's, reworked by tau2 (failures raise "Error: <Message>",
records come back in the model shape with nulls, `get_item_details` added, `think` removed,
address and payment changes allowed on "pending (item modified)" orders)."""
from __future__ import annotations

import json

from tarl_jax.sandbox.domains import calculate_value, need, need_text, tool
from tarl_jax.sandbox.domains.models import Models

MODELS = Models({
    "Variant": [("item_id", str), ("options", ("dict", str)), ("available", bool),
                ("price", float)],
    "Product": [("name", str), ("product_id", str), ("variants", ("dict", "Variant"))],
    "UserName": [("first_name", str), ("last_name", str)],
    "UserAddress": [("address1", str), ("address2", str), ("city", str), ("country", str),
                    ("state", str), ("zip", str)],
    "CreditCard": [("source", str), ("id", str), ("brand", str), ("last_four", str)],
    "Paypal": [("source", str), ("id", str)],
    "GiftCard": [("source", str), ("id", str), ("balance", float)],
    "PaymentMethod": {"by": "source", "credit_card": "CreditCard", "paypal": "Paypal",
                      "gift_card": "GiftCard"},
    "User": [("user_id", str), ("name", "UserName"), ("address", "UserAddress"), ("email", str),
             ("payment_methods", ("dict", "PaymentMethod")), ("orders", ("list", str))],
    "OrderFullfilment": [("tracking_id", ("list", str)), ("item_ids", ("list", str))],
    "OrderItem": [("name", str), ("product_id", str), ("item_id", str), ("price", float),
                  ("options", ("dict", str))],
    "OrderPayment": [("transaction_type", ("lit", "payment", "refund")), ("amount", float),
                     ("payment_method_id", str)],
    "Order": [("order_id", str), ("user_id", str), ("address", "UserAddress"),
              ("items", ("list", "OrderItem")),
              ("status", ("lit", "processed", "pending", "pending (item modified)", "delivered",
                          "cancelled", "exchange requested", "return requested")),
              ("fulfillments", ("list", "OrderFullfilment")),
              ("payment_history", ("list", "OrderPayment")),
              ("cancel_reason", ("opt", ("lit", "no longer needed", "ordered by mistake"))),
              ("exchange_items", ("opt", ("list", str))),
              ("exchange_new_items", ("opt", ("list", str))),
              ("exchange_payment_method_id", ("opt", str)),
              ("exchange_price_difference", ("opt", float)),
              ("return_items", ("opt", ("list", str))),
              ("return_payment_method_id", ("opt", str))],
})
TABLE_MODELS = {"users": "User", "orders": "Order", "products": "Product"}

method = tool("RetailTools", method=True)



def _order(data, order_id):
    return need(data, "orders", order_id, "Order not found")


def _user(data, user_id):
    return need(data, "users", user_id, "User not found")


def _variant(data, product_id, variant_id):
    variants = need(data, "products", product_id, "Product not found")["variants"]
    if variant_id not in variants:
        raise ValueError("Variant not found")
    return variants[variant_id]


def _payment_method(user, payment_method_id):
    if payment_method_id not in user["payment_methods"]:
        raise ValueError("Payment method not found")
    return user["payment_methods"][payment_method_id]


def _check_counts(order, item_ids, message):
    all_item_ids = [item["item_id"] for item in order["items"]]
    for item_id in item_ids:
        if item_ids.count(item_id) > all_item_ids.count(item_id):
            raise ValueError(message(item_id))


def _find_item(order, item_id):
    item = next((item for item in order["items"] if item["item_id"] == item_id), None)
    if item is None:
        raise ValueError(f"Item {item_id} not found")
    return item


def _payment(kind, amount, payment_method_id):
    return MODELS.build("OrderPayment", {"transaction_type": kind, "amount": amount,
                                         "payment_method_id": payment_method_id})


@method
def calculate(data, expression):
    return calculate_value(expression)


@method
def cancel_pending_order(data, order_id, reason):
    order = _order(data, order_id)
    if order["status"] != "pending":
        raise ValueError("Non-pending order cannot be cancelled")
    if reason not in {"no longer needed", "ordered by mistake"}:
        raise ValueError("Invalid reason")
    refunds, user = [], None
    for payment in order["payment_history"]:
        payment_id = payment["payment_method_id"]
        refunds.append(_payment("refund", payment["amount"], payment_id))
        user = user or _user(data, order["user_id"])
        method = _payment_method(user, payment_id)
        if method["source"] == "gift_card":
            method["balance"] += payment["amount"]
            method["balance"] = round(method["balance"], 2)
    order["status"] = "cancelled"
    order["cancel_reason"] = reason
    order["payment_history"].extend(refunds)
    data.put("orders", order_id, order)
    if user is not None:
        data.put("users", order["user_id"], user)
    return json.dumps(order)


@method
def exchange_delivered_order_items(data, order_id, item_ids, new_item_ids, payment_method_id):
    order = _order(data, order_id)
    if order["status"] != "delivered":
        raise ValueError("Non-delivered order cannot be exchanged")
    _check_counts(order, item_ids, lambda i: f"Number of {i} not found.")
    if len(item_ids) != len(new_item_ids):
        raise ValueError("The number of items to be exchanged should match.")
    diff_price = 0
    for item_id, new_item_id in zip(item_ids, new_item_ids):
        item = _find_item(order, item_id)
        variant = _variant(data, item["product_id"], new_item_id)
        if not variant["available"]:
            raise ValueError(f"New item {new_item_id} not found or available")
        diff_price += variant["price"] - item["price"]
    diff_price = round(diff_price, 2)
    method = _payment_method(_user(data, order["user_id"]), payment_method_id)
    if method["source"] == "gift_card" and method["balance"] < diff_price:
        raise ValueError("Insufficient gift card balance to pay for the price difference")
    order["status"] = "exchange requested"
    order["exchange_items"] = sorted(item_ids)
    order["exchange_new_items"] = sorted(new_item_ids)
    order["exchange_payment_method_id"] = payment_method_id
    order["exchange_price_difference"] = diff_price
    data.put("orders", order_id, order)
    return json.dumps(order)


@method
def find_user_id_by_name_zip(data, first_name, last_name, zip):
    for user_id, user in data.scan("users", first_name_lower=first_name.lower()):
        if (user["name"]["last_name"].lower() == last_name.lower()
                and user["address"]["zip"] == zip):
            return user_id
    raise ValueError("User not found")


@method
def find_user_id_by_email(data, email):
    for user_id, _ in data.scan("users", email_lower=email.lower()):
        return user_id
    raise ValueError("User not found")



@method
def get_order_details(data, order_id):
    return need_text(data, "orders", order_id, "Order not found")


@method
def get_product_details(data, product_id):
    return need_text(data, "products", product_id, "Product not found")


@method
def get_item_details(data, item_id):
    for _, product in data.scan("products"):
        if item_id in product["variants"]:
            return json.dumps(product["variants"][item_id])
    raise ValueError("Item not found")


@method
def get_user_details(data, user_id):
    return need_text(data, "users", user_id, "User not found")


@method
def list_all_product_types(data):
    names = {product["name"]: product["product_id"] for _, product in data.scan("products")}
    return json.dumps(names, sort_keys=True)


def _address(address1, address2, city, state, country, zip):
    return MODELS.build("UserAddress", {"address1": address1, "address2": address2,
                                        "city": city, "state": state, "country": country,
                                        "zip": zip})


@method
def modify_pending_order_address(data, order_id, address1, address2, city, state, country, zip):
    order = _order(data, order_id)
    if "pending" not in order["status"]:
        raise ValueError("Non-pending order cannot be modified")
    order["address"] = _address(address1, address2, city, state, country, zip)
    data.put("orders", order_id, order)
    return json.dumps(order)


@method
def modify_pending_order_items(data, order_id, item_ids, new_item_ids, payment_method_id):
    order = _order(data, order_id)
    if order["status"] != "pending":
        raise ValueError("Non-pending order cannot be modified")
    _check_counts(order, item_ids, lambda i: f"{i} not found")
    if len(item_ids) != len(new_item_ids):
        raise ValueError("The number of items to be exchanged should match")
    diff_price, variant = 0, None
    for item_id, new_item_id in zip(item_ids, new_item_ids):
        if item_id == new_item_id:
            raise ValueError("The new item id should be different from the old item id")
        item = _find_item(order, item_id)
        variant = _variant(data, item["product_id"], new_item_id)
        if not variant["available"]:
            raise ValueError(f"New item {new_item_id} not found or available")
        diff_price += variant["price"] - item["price"]
    user = _user(data, order["user_id"])
    method = _payment_method(user, payment_method_id)
    if method["source"] == "gift_card" and method["balance"] < diff_price:
        raise ValueError("Insufficient gift card balance to pay for the new item")
    order["payment_history"].append(_payment("payment" if diff_price > 0 else "refund",
                                             abs(diff_price), payment_method_id))
    if method["source"] == "gift_card":
        method["balance"] -= diff_price
        method["balance"] = round(method["balance"], 2)
        data.put("users", order["user_id"], user)
    for item_id, new_item_id in zip(item_ids, new_item_ids):
        item = _find_item(order, item_id)
        item["item_id"] = new_item_id
        # tau2 prices every item with the loop's last variant (a tau2 bug kept on purpose).
        item["price"] = variant["price"]
        item["options"] = variant["options"]
    order["status"] = "pending (item modified)"
    data.put("orders", order_id, order)
    return json.dumps(order)


@method
def modify_pending_order_payment(data, order_id, payment_method_id):
    order = _order(data, order_id)
    if "pending" not in order["status"]:
        raise ValueError("Non-pending order cannot be modified")
    user = _user(data, order["user_id"])
    method = _payment_method(user, payment_method_id)
    history = order["payment_history"]
    if len(history) != 1 or history[0]["transaction_type"] != "payment":
        raise ValueError("There should be exactly one payment for a pending order")
    if history[0]["payment_method_id"] == payment_method_id:
        raise ValueError("The new payment method should be different from the current one")
    amount = history[0]["amount"]
    if method["source"] == "gift_card" and method["balance"] < amount:
        raise ValueError("Insufficient gift card balance to pay for the order")
    old_id = history[0]["payment_method_id"]
    history.extend([_payment("payment", amount, payment_method_id),
                    _payment("refund", amount, old_id)])
    if method["source"] == "gift_card":
        method["balance"] -= amount
        method["balance"] = round(method["balance"], 2)
    old = _payment_method(user, old_id)
    if old["source"] == "gift_card":
        old["balance"] += amount
        old["balance"] = round(old["balance"], 2)
    data.put("orders", order_id, order)
    data.put("users", order["user_id"], user)
    return json.dumps(order)


@method
def modify_user_address(data, user_id, address1, address2, city, state, country, zip):
    user = _user(data, user_id)
    user["address"] = _address(address1, address2, city, state, country, zip)
    data.put("users", user_id, user)
    return json.dumps(user)


@method
def return_delivered_order_items(data, order_id, item_ids, payment_method_id):
    order = _order(data, order_id)
    if order["status"] != "delivered":
        raise ValueError("Non-delivered order cannot be returned")
    method = _payment_method(_user(data, order["user_id"]), payment_method_id)
    if (method["source"] != "gift_card"
            and payment_method_id != order["payment_history"][0]["payment_method_id"]):
        raise ValueError("Payment method should be the original payment method")
    _check_counts(order, item_ids, lambda i: "Some item not found")
    order["status"] = "return requested"
    order["return_items"] = sorted(item_ids)
    order["return_payment_method_id"] = payment_method_id
    data.put("orders", order_id, order)
    return json.dumps(order)


@method
def transfer_to_human_agents(data, summary):
    return "Transfer successful"


TOOLS = [calculate, cancel_pending_order, exchange_delivered_order_items,
         find_user_id_by_name_zip, find_user_id_by_email, get_order_details,
         get_product_details, get_item_details, get_user_details, list_all_product_types,
         modify_pending_order_address, modify_pending_order_items, modify_pending_order_payment,
         modify_user_address, return_delivered_order_items, transfer_to_human_agents]
