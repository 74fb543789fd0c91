"""A synthetic retail world and its tasks, plus a scripted expert that solves any task.

The world has exactly tau-bench v1 retail's JSON shape (users / orders / products keyed by id),
so the sandbox's World and tools load it unchanged, but every name, id and value is generated
here from a seed: the embedded default trains without downloading anything and never sees a
tau-bench test record. User ids carry a five-digit suffix (tau-bench's have four) and task ids a
`synth-` prefix, so the two can never collide.

Each task's gold actions are built from the generated state so that they really apply (pending
orders for cancel/modify, delivered ones for return/exchange, gift cards with enough balance).

`ExpertAgent` turns any task (synthetic, tau-bench retail or airline) into a natural dialogue:
it asks the user to identify themselves, replays the gold reads as tool calls, states each write
and waits for a "yes", answers the required outputs and closes. Its episodes are warm-start
demonstrations.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import random
import re

from tarl_jax.sandbox import domains
from tarl_jax.sandbox.db import World
from tarl_jax.sandbox.episode import AgentReply
from tarl_jax.sandbox.tasks import Action, Task

# Product types: "name: price range", then one indented "option: values" line per option.
# Written for this project.
_CATALOGUE_TEXT = """
Rain Jacket: 60-160
  size: S, M, L, XL
  color: navy, olive, yellow, black
  hood: detachable, fixed
Trail Running Shoes: 80-190
  size: 7, 8, 9, 10, 11, 12
  color: grey, orange, blue
  waterproof: yes, no
Coffee Grinder: 30-220
  type: burr, blade
  capacity: small, large
  color: black, silver, white
Yoga Mat: 20-95
  thickness: 4mm, 6mm, 8mm
  material: TPE, natural rubber, PVC
  color: purple, teal, grey
Bluetooth Speaker: 40-260
  color: red, black, white
  battery life: 8 hours, 12 hours, 20 hours
  water resistance: IPX4, IPX7, none
Travel Duffel: 45-210
  capacity: 30L, 45L, 60L
  material: canvas, nylon, leather
  color: brown, black, green
Electric Toothbrush: 25-140
  modes: 3, 5
  color: white, black, pink
  battery: rechargeable, AA
Blender: 50-300
  capacity: 1L, 1.5L, 2L
  power: 600W, 900W, 1200W
  color: black, red, silver
Computer Monitor: 140-650
  size: 24 inch, 27 inch, 32 inch
  resolution: 1080p, 1440p, 4K
  refresh rate: 60Hz, 144Hz
Wireless Mouse: 15-110
  color: black, white, blue
  connectivity: bluetooth, USB receiver
  grip: ergonomic, ambidextrous
Cookware Set: 80-420
  pieces: 5, 8, 12
  material: stainless steel, cast iron, nonstick
Camping Tent: 90-520
  capacity: 2-person, 4-person, 6-person
  season: 3-season, 4-season
  color: green, orange, blue
Sunglasses: 30-240
  frame: metal, acetate
  lens: polarized, gradient, mirrored
  color: black, tortoise, gold
Board Game: 20-90
  theme: strategy, party, cooperative
  players: 2-4, 3-6, 2-8
Fitness Tracker: 45-260
  color: black, rose, blue
  strap: silicone, fabric, metal
  GPS: yes, no
Air Purifier: 90-480
  room size: small, medium, large
  filter: HEPA, carbon
  color: white, black
Wall Clock: 20-130
  diameter: 10 inch, 12 inch, 16 inch
  style: modern, rustic, minimalist
  color: black, white, wood
Rice Cooker: 35-320
  capacity: 3 cups, 6 cups, 10 cups
  feature: basic, fuzzy logic, pressure
Winter Gloves: 15-95
  size: S, M, L
  material: wool, leather, fleece
  touchscreen: yes, no
Bike Helmet: 35-180
  size: S, M, L
  color: white, black, red
  visor: yes, no
Portable Charger: 18-95
  capacity: 5000mAh, 10000mAh, 20000mAh
  color: black, white
  ports: 1, 2, 3
Notebook Set: 10-45
  ruling: lined, dotted, blank
  cover: hard, soft
  size: A5, A4
Gaming Chair: 150-520
  color: black, red, blue
  material: mesh, leather
  lumbar support: yes, no
Water Filter Pitcher: 20-75
  capacity: 6 cups, 10 cups
  color: clear, blue, grey
  filter: standard, long-life
Hair Dryer: 25-260
  wattage: 1200W, 1800W
  color: black, pink, white
  attachment: diffuser, concentrator, both
Garden Hose: 20-110
  length: 25 ft, 50 ft, 100 ft
  material: rubber, vinyl
Knife Set: 40-380
  pieces: 3, 6, 10
  handle: wood, steel, polymer
  block: yes, no
Scarf: 20-180
  material: cashmere, cotton, silk
  color: red, grey, camel
  pattern: plain, plaid, striped
Camera Drone: 150-1200
  camera: 1080p, 4K
  flight time: 20 min, 30 min, 40 min
  color: grey, white
Standing Desk: 250-800
  width: 48 inch, 60 inch
  top: bamboo, oak, white laminate
  motor: single, dual
"""


def _parse_catalogue(text: str) -> list[tuple[str, dict[str, list[str]], tuple[int, int]]]:
    out = []
    for line in text.strip().splitlines():
        key, values = (part.strip() for part in line.split(":"))
        if line.startswith(" "):
            out[-1][1][key] = [v.strip() for v in values.split(",")]
        else:
            out.append((key, {}, tuple(int(x) for x in values.split("-"))))
    return out


CATALOGUE = _parse_catalogue(_CATALOGUE_TEXT)

FIRST_NAMES = ["Amara", "Bruno", "Celine", "Dmitri", "Esme", "Farid", "Greta", "Hiroshi", "Ines",
               "Jonas", "Kalani", "Luca", "Maren", "Nikhil", "Odette", "Pavel", "Quinn", "Rosa",
               "Soren", "Talia", "Umar", "Vera", "Wendell", "Ximena", "Yosef", "Zara", "Anika",
               "Bastian", "Cosima", "Desmond", "Elif", "Florian", "Gideon", "Hana", "Idris", "Juno"]
LAST_NAMES = ["Abernathy", "Bergstrom", "Castellano", "Dubois", "Eriksen", "Fontaine", "Gallagher",
              "Haddad", "Ibarra", "Jablonski", "Kowalczyk", "Lindqvist", "Mbeki", "Nakamura",
              "Okafor", "Petrov", "Quintero", "Rasmussen", "Sorensen", "Takahashi", "Uchenna",
              "Valdivia", "Whitfield", "Xiong", "Yamamoto", "Zielinski"]
STREETS = ["Alder Lane", "Birch Court", "Canyon Road", "Dockside Way", "Elmwood Avenue",
           "Foxglove Street", "Granite Boulevard", "Harbor View", "Ironwood Drive", "Juniper Path",
           "Kestrel Place", "Lakeshore Drive", "Meadowbrook Road", "Northgate Avenue"]
# (city, state, first three zip digits)
CITIES = [("Portland", "OR", "972"), ("Boise", "ID", "837"), ("Tucson", "AZ", "857"),
          ("Omaha", "NE", "681"), ("Madison", "WI", "537"), ("Raleigh", "NC", "276"),
          ("Albuquerque", "NM", "871"), ("Richmond", "VA", "232"), ("Spokane", "WA", "992"),
          ("Savannah", "GA", "314"), ("Buffalo", "NY", "142"), ("Lexington", "KY", "405")]
CARD_BRANDS = ["visa", "mastercard", "amex", "discover"]
PERSONAS = ["You are polite and patient.", "You are in a hurry and keep your answers short.",
            "You are a little anxious and like to double-check details.",
            "You are friendly and chatty.", "You are direct and to the point."]
CANCEL_REASONS = {"no longer needed": "you no longer need it",
                  "ordered by mistake": "you ordered it by mistake"}

# Status mix of generated orders (tau-bench's data plus the states its write tools leave behind).
ORDER_STATUSES = {"pending": 0.34, "processed": 0.1, "delivered": 0.34, "cancelled": 0.08,
                  "pending (item modified)": 0.05, "return requested": 0.045,
                  "exchange requested": 0.045}
TASK_KINDS = {"cancel": 3, "modify_address": 2, "modify_payment": 2, "modify_items": 3,
              "return": 3, "exchange": 3, "user_address": 2, "lookup": 3, "other_user": 1}


# The synthetic store's agent policy: the rules tau-bench's retail agents follow, in our words.
POLICY = """# Store support policy

You are a customer-service agent of an online store. You can cancel or modify pending orders,
return or exchange delivered orders, update a customer's default address, and answer questions
about the customer's profile, orders and the store's products.

- First authenticate the customer: find their user id from their email, or from their first
  name, last name and zip code. Do this even when they tell you their user id.
- Help only the authenticated customer; decline requests about anyone else.
- Before any change (cancel, modify, return, exchange, address update), list its details and
  wait for the customer's explicit "yes".
- Use only what the customer or the tools tell you. Do not guess, and give no personal opinions.
- Make at most one tool call per message, and do not write to the customer in a message that
  makes a tool call.
- Transfer to a human agent only when the request is outside what your tools can do.

## Orders and products
- Every product has a product id; each of its variants (items) has an item id. The two kinds of
  ids are unrelated.
- An order is pending, processed, delivered or cancelled, or shows an earlier change:
  "pending (item modified)", "return requested", "exchange requested". Check the status first:
  only pending orders can be cancelled or modified, only delivered orders returned or exchanged.
- Cancel: needs the order id and the reason, "no longer needed" or "ordered by mistake". A gift
  card is refunded at once, other methods within 5 to 7 business days.
- Modify a pending order: its shipping address; its payment method (one method, different from
  the current one; a gift card must cover the total); or its items (each to another available
  variant of the same product, with a payment method for the price difference; a gift card must
  cover it). Items can be modified only once per order, so collect every item first.
- Return: needs the order id, the items and where the refund goes (the original payment method
  or a gift card).
- Exchange: each item to another available variant of the same product, with a payment method
  for the price difference. Collect every item first: an order is exchanged only once.
"""


@dataclasses.dataclass
class SynthConfig:
    seed: int = 0
    num_users: int = 50
    num_products: int = 20
    num_orders: int = 150
    num_tasks: int = 200
    level: int = 2          # difficulty (LEVELS); 2 is the tau-bench-shaped world


# The difficulty ladder. Every level has the same tools, real database writes and the same
# outcome rule (the database after the dialogue equals the gold replay's); what shrinks is the
# path to it.
#   0  one cancellation: the user names the order and the reason in their first message and is
#      already signed in; the agent confirms, calls cancel_pending_order with the order id and
#      reason copied from the dialogue, and closes. Short ids, one item per order.
#   1  one request of several kinds (cancel, change the payment or the address of a pending
#      order, return items), signed in; the agent looks the order up first, and payment
#      methods and items come from tool results. Short ids, one or two items per order.
#   2  tau-bench's shape: identify the user, one or two requests of every kind, full-length ids,
#      up to five items per order, questions whose answers are in the database.
LEVELS = (0, 1, 2)
_SHORT_DIGITS = {10: 6, 7: 4, 5: 3, 12: 6, 4: 4}   # id length at levels 0-1, by level-2 length
_LEVEL_KINDS = {0: {"cancel": 1},
                1: {"cancel": 2, "modify_payment": 2, "modify_address": 1, "return": 2}}


def generate(cfg: SynthConfig | None = None) -> tuple[dict, list[Task]]:
    """Returns (tables, tasks): tables = {"users", "orders", "products"} as in tau-bench v1."""
    cfg = cfg or SynthConfig()
    if cfg.level not in LEVELS:
        raise ValueError(f"world.synth.level={cfg.level}: choose from {LEVELS}")
    tables = generate_world(cfg.seed, cfg.num_users, cfg.num_products, cfg.num_orders, cfg.level)
    return tables, generate_tasks(tables, cfg.seed, cfg.num_tasks, cfg.level)


def write_targets(task: Task) -> set[str]:
    """The records a task's gold writes change (orders, user accounts)."""
    return {f"{k}={a.kwargs[k]}" for a in domains.gold_writes(task)
            for k in ("order_id", "user_id", "reservation_id") if k in a.kwargs}


def split(tasks: list[Task], test: int, validation: int = 0) -> dict[str, list[Task]]:
    """The one rule for the synthetic splits: test = the last `test` tasks, validation = the
    `validation` before them, train = the rest less every task that writes a record a test or
    validation task writes (so held-out requests are new combinations, never a training
    request on the same order or account). Tune on validation; report test."""
    if test + validation >= len(tasks):
        raise ValueError(f"{test} test + {validation} validation tasks leave none of "
                         f"{len(tasks)} for training")
    cut = len(tasks) - test - validation
    held = tasks[cut:]
    taken = set().union(*(write_targets(t) for t in held))
    return {"train": [t for t in tasks[:cut] if not write_targets(t) & taken],
            "validation": held[:validation], "test": held[validation:]}


def make_world(cfg: SynthConfig | None = None) -> tuple[World, list[Task]]:
    """A loaded World (with POLICY as its system prompt) and the tasks for it."""
    tables, tasks = generate(cfg)
    return World.from_tables("retail", tables, policy=POLICY), tasks


def write_json(out_dir, tables: dict, tasks: list[Task]) -> None:
    """Writes a tau-bench v1 domain dir (users/orders/products.json, wiki.md) and tasks.json
    (a v1 task list with task_id and extra added)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        (out / f"{name}.json").write_text(json.dumps(table, indent=1))
    (out / "wiki.md").write_text(POLICY)
    rows = [dict(task_id=t.task_id, user_id=t.user_id, instruction=t.instruction,
                 actions=[dict(name=a.name, kwargs=a.kwargs) for a in t.actions],
                 outputs=t.outputs, extra=t.extra) for t in tasks]
    (out / "tasks.json").write_text(json.dumps(rows, indent=1))


# ----------------------------------------------------------------------------- world

class _Ids:
    """Unique random digit strings (ids in one world never repeat across kinds)."""

    def __init__(self, rng: random.Random):
        self.rng, self.seen = rng, set()

    def __call__(self, digits: int) -> str:
        while True:
            s = str(self.rng.randrange(10 ** (digits - 1), 10 ** digits))
            if s not in self.seen:
                self.seen.add(s)
                return s


def _address(rng: random.Random) -> dict:
    city, state, zip3 = rng.choice(CITIES)
    return {"address1": f"{rng.randrange(10, 999)} {rng.choice(STREETS)}",
            "address2": rng.choice([f"Suite {rng.randrange(100, 999)}",
                                    f"Apt {rng.randrange(1, 60)}"]),
            "city": city, "country": "USA", "state": state, "zip": f"{zip3}{rng.randrange(10, 99)}"}


def generate_world(seed: int = 0, num_users: int = 50, num_products: int = 20,
                   num_orders: int = 150, level: int = 2) -> dict:
    if num_products > len(CATALOGUE):
        raise ValueError(f"num_products={num_products}, but CATALOGUE has {len(CATALOGUE)} types")
    if num_users > len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(f"num_users={num_users} exceeds the distinct names available")
    rng = random.Random(f"world-{seed}")
    ids = _Ids(rng)
    new_id = ids if level >= 2 else (lambda digits: ids(_SHORT_DIGITS.get(digits, digits)))
    max_items = {0: 1, 1: 2}.get(level, 5)

    products = {}
    for name, options, (lo, hi) in rng.sample(CATALOGUE, num_products):
        combos = list(itertools.product(*options.values()))
        variants = {}
        for combo in rng.sample(combos, min(len(combos), rng.randint(4, 12))):
            item_id = new_id(10)
            variants[item_id] = {"item_id": item_id,
                                 "options": dict(zip(options, combo, strict=True)),
                                 "available": rng.random() < 0.8,
                                 "price": round(rng.uniform(lo, hi), 2)}
        pid = new_id(10)
        products[pid] = {"name": name, "product_id": pid, "variants": variants}

    users, names = {}, set()
    while len(users) < num_users:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        if (first, last) in names:  # name alone then identifies a user: no ambiguous name+zip
            continue
        names.add((first, last))
        uid = f"{first.lower()}_{last.lower()}_{new_id(5)}"
        methods = {}
        for source in rng.sample(["credit_card", "paypal", "gift_card", "credit_card"],
                                 rng.randint(1, 3)):
            pm_id = f"{source}_{new_id(7)}"
            pm = {"source": source}
            if source == "credit_card":
                pm.update(brand=rng.choice(CARD_BRANDS), last_four=f"{rng.randrange(10000):04d}")
            elif source == "gift_card":
                # tau-bench stores whole-dollar balances as ints: keep both kinds.
                pm["balance"] = (round(rng.uniform(0, 400), 2) if rng.random() < 0.7
                                 else rng.randrange(0, 300))
            pm["id"] = pm_id
            methods[pm_id] = pm
        users[uid] = {"name": {"first_name": first, "last_name": last}, "address": _address(rng),
                      "email": f"{first.lower()}.{last.lower()}{new_id(4)}@example.com",
                      "payment_methods": methods, "orders": []}

    all_variants = [(p, v) for p in products.values() for v in p["variants"].values()]
    user_ids = list(users)
    orders = {}
    for k in range(num_orders):
        uid = user_ids[k] if k < len(user_ids) else rng.choice(user_ids)  # everyone has an order
        user = users[uid]
        oid = f"#W{new_id(7)}"
        picks = []
        for p, v in rng.sample(all_variants, rng.randint(1, max_items)):
            if v["item_id"] not in {i["item_id"] for i in picks}:
                picks.append({"name": p["name"], "product_id": p["product_id"],
                              "item_id": v["item_id"], "price": v["price"],
                              "options": dict(v["options"])})
        status = rng.choices(list(ORDER_STATUSES), weights=list(ORDER_STATUSES.values()))[0]
        pm_id = rng.choice(list(user["payment_methods"]))
        total = round(sum(i["price"] for i in picks), 2)
        order = {"order_id": oid, "user_id": uid,
                 "address": dict(user["address"]) if rng.random() < 0.85 else _address(rng),
                 "items": picks, "fulfillments": [], "status": status,
                 "payment_history": [{"transaction_type": "payment", "amount": total,
                                      "payment_method_id": pm_id}]}
        _apply_status(rng, order, status, products, new_id)
        orders[oid] = order
        user["orders"].append(oid)
    return {"users": users, "orders": orders, "products": products}


def _apply_status(rng, order: dict, status: str, products: dict, new_id) -> None:
    """Adds the fields that tau-bench's tools leave on an order in `status`."""
    items, pm_id = order["items"], order["payment_history"][0]["payment_method_id"]
    if status not in ("pending", "pending (item modified)", "cancelled"):
        order["fulfillments"] = [{"tracking_id": [new_id(12)],
                                  "item_ids": [i["item_id"] for i in items]}]
    if status == "cancelled":
        order["payment_history"].append({"transaction_type": "refund",
                                         "amount": order["payment_history"][0]["amount"],
                                         "payment_method_id": pm_id})
    elif status == "pending (item modified)":
        item = items[0]
        others = [v for v in products[item["product_id"]]["variants"].values()
                  if v["item_id"] != item["item_id"]]
        if others:
            new = rng.choice(others)
            diff = round(new["price"] - item["price"], 2)
            item.update(item_id=new["item_id"], price=new["price"], options=dict(new["options"]))
            order["payment_history"].append({
                "transaction_type": "payment" if diff > 0 else "refund", "amount": abs(diff),
                "payment_method_id": pm_id})
    elif status == "return requested":
        order["return_items"] = sorted(i["item_id"] for i in items[:rng.randint(1, len(items))])
        order["return_payment_method_id"] = pm_id
    elif status == "exchange requested":
        item = items[0]
        new = rng.choice(list(products[item["product_id"]]["variants"].values()))
        order["exchange_items"] = [item["item_id"]]
        order["exchange_new_items"] = [new["item_id"]]
        order["exchange_payment_method_id"] = pm_id
        order["exchange_price_difference"] = round(new["price"] - item["price"], 2)


# ----------------------------------------------------------------------------- tasks

def _act(name: str, **kwargs) -> Action:
    return Action(name=name, kwargs=kwargs)


def _options(opts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in opts.items())


def _addr_text(a: dict) -> str:
    return ", ".join(str(a.get(k, "")) for k in ("address1", "address2", "city", "state", "zip",
                                                   "country"))


def _pm_text(pm: dict) -> str:
    if pm["source"] == "credit_card":
        return f"your {pm['brand']} credit card ending in {pm['last_four']}"
    return "your PayPal account" if pm["source"] == "paypal" else "your gift card"


@dataclasses.dataclass
class _Request:
    instruction: str
    reads: list[Action]
    write: Action | None = None
    outputs: list[str] = dataclasses.field(default_factory=list)
    answer: str = ""        # what the expert says (the outputs, or why it declines)
    question: str = ""      # what the offline user asks to get the outputs
    request: str = ""       # what the offline user asks for where no gold write says it


class _TaskMaker:
    def __init__(self, tables: dict, rng: random.Random):
        self.t, self.rng = tables, rng

    def orders_of(self, uid: str, *statuses: str) -> list[dict]:
        return [self.t["orders"][o] for o in self.t["users"][uid]["orders"]
                if self.t["orders"][o]["status"] in statuses]

    def find_order(self, uid: str, order: dict) -> tuple[str, list[Action]]:
        """How the user refers to the order, and the reads that locate it."""
        if self.rng.random() < 0.7:
            oid = order["order_id"]
            return f"order {oid}", [_act("get_order_details", order_id=oid)]
        names = " and the ".join(sorted({i["name"] for i in order["items"]}))
        reads = [_act("get_user_details", user_id=uid)]
        for oid in self.t["users"][uid]["orders"]:
            reads.append(_act("get_order_details", order_id=oid))
            if oid == order["order_id"]:
                break
        return f"the order with the {names} (you don't remember its id)", reads

    def swaps(self, order: dict, n: int) -> list[tuple[dict, dict]]:
        """Up to n (old item, available new variant of the same product) pairs."""
        pairs = []
        for item in self.rng.sample(order["items"], len(order["items"])):
            variants = self.t["products"][item["product_id"]]["variants"].values()
            others = [v for v in variants if v["item_id"] != item["item_id"] and v["available"]]
            if others:
                pairs.append((item, self.rng.choice(others)))
            if len(pairs) == n:
                break
        return pairs

    def payment_for(self, uid: str, amount: float, exclude=()) -> dict | None:
        """A payment method of the user that can cover `amount` (gift cards need the balance)."""
        methods = self.t["users"][uid]["payment_methods"].values()
        ok = [pm for pm in methods if pm["id"] not in exclude
              and (pm["source"] != "gift_card" or pm["balance"] >= amount)]
        return self.rng.choice(ok) if ok else None

    def cancel(self, uid):
        orders = self.orders_of(uid, "pending")
        if not orders:
            return None
        order = self.rng.choice(orders)
        ref, reads = self.find_order(uid, order)
        reason = self.rng.choice(list(CANCEL_REASONS))
        return _Request(f"You want to cancel {ref} because {CANCEL_REASONS[reason]}.", reads,
                        _act("cancel_pending_order", order_id=order["order_id"], reason=reason))

    def modify_address(self, uid):
        orders = self.orders_of(uid, "pending")
        if not orders:
            return None
        order = self.rng.choice(orders)
        ref, reads = self.find_order(uid, order)
        new = _address(self.rng)
        return _Request(f"You want the shipping address of {ref} changed to {_addr_text(new)}.",
                        reads,
                        _act("modify_pending_order_address", order_id=order["order_id"], **new))

    def modify_payment(self, uid):
        orders = [o for o in self.orders_of(uid, "pending") if len(o["payment_history"]) == 1]
        if not orders:
            return None
        order = self.rng.choice(orders)
        old = order["payment_history"][0]
        pm = self.payment_for(uid, old["amount"], exclude={old["payment_method_id"]})
        if pm is None:
            return None
        ref, reads = self.find_order(uid, order)
        return _Request(f"You want to pay for {ref} with {_pm_text(pm)} instead.",
                        [_act("get_user_details", user_id=uid)] + reads,
                        _act("modify_pending_order_payment", order_id=order["order_id"],
                             payment_method_id=pm["id"]))

    def _swap_request(self, uid, statuses, verb, tool):
        orders = self.orders_of(uid, *statuses)
        if not orders:
            return None
        order = self.rng.choice(orders)
        pairs = self.swaps(order, self.rng.randint(1, 2))
        if not pairs:
            return None
        diff = round(sum(new["price"] - old["price"] for old, new in pairs), 2)
        pm = self.payment_for(uid, diff)
        if pm is None:
            return None
        ref, reads = self.find_order(uid, order)
        reads += [_act("get_product_details", product_id=pid)
                  for pid in dict.fromkeys(old["product_id"] for old, _ in pairs)]
        wants = "; ".join(f"the {old['name']} ({_options(old['options'])}) for one with "
                          f"{_options(new['options'])}" for old, new in pairs)
        text = (f"In {ref} you want to {verb} {wants}. Any price difference goes through "
                f"{_pm_text(pm)}. Those are all the items you want to change.")
        return _Request(text, reads, _act(tool, order_id=order["order_id"],
                                          item_ids=[old["item_id"] for old, _ in pairs],
                                          new_item_ids=[new["item_id"] for _, new in pairs],
                                          payment_method_id=pm["id"]))

    def modify_items(self, uid):
        return self._swap_request(uid, ["pending"], "change", "modify_pending_order_items")

    def exchange(self, uid):
        return self._swap_request(uid, ["delivered"], "exchange", "exchange_delivered_order_items")

    def return_(self, uid):
        orders = self.orders_of(uid, "delivered")
        if not orders:
            return None
        order = self.rng.choice(orders)
        items = self.rng.sample(order["items"], self.rng.randint(1, len(order["items"])))
        original = order["payment_history"][0]["payment_method_id"]
        methods = self.t["users"][uid]["payment_methods"]
        choices = [original] + [p for p in methods
                                if methods[p]["source"] == "gift_card" and p != original]
        pm = methods[self.rng.choice(choices)]
        ref, reads = self.find_order(uid, order)
        names = ", ".join(f"the {i['name']} ({_options(i['options'])})" for i in items)
        return _Request(f"You want to return {names} from {ref}, with the refund going to "
                        f"{_pm_text(pm)}.", reads,
                        _act("return_delivered_order_items", order_id=order["order_id"],
                             item_ids=[i["item_id"] for i in items], payment_method_id=pm["id"]))

    def other_user(self, uid):
        """A request about someone else's order: the policy says decline, the tools would not."""
        orders = [o for o in self.t["orders"].values()
                  if o["user_id"] != uid and o["status"] == "pending"]
        if not orders:
            return None
        oid = self.rng.choice(orders)["order_id"]
        return _Request(f"You want to cancel order {oid}, which a friend placed on their own "
                        "account, because they no longer need it. If the agent declines, accept.",
                        [_act("get_order_details", order_id=oid)],
                        request=f"Could you cancel my friend's order {oid}? "
                                "They no longer need it.",
                        answer=f"I'm sorry, but order {oid} belongs to another customer's "
                               "account, so I can't make changes to it.")

    def user_address(self, uid):
        new = _address(self.rng)
        return _Request(f"You moved and want your default address updated to {_addr_text(new)}.",
                        [_act("get_user_details", user_id=uid)],
                        _act("modify_user_address", user_id=uid, **new))

    def lookup(self, uid):
        user, rng = self.t["users"][uid], self.rng
        kinds = ["stock"]
        shipped = self.orders_of(uid, "processed", "delivered")
        cards = [pm for pm in user["payment_methods"].values() if pm["source"] == "gift_card"]
        kinds += ["tracking"] * bool(shipped) + ["balance"] * bool(cards)
        kind = rng.choice(kinds)
        if kind == "stock":
            p = rng.choice(list(self.t["products"].values()))
            n = str(sum(v["available"] for v in p["variants"].values()))
            q = f"how many {p['name']} options are available right now"
            reads = [_act("list_all_product_types"),
                     _act("get_product_details", product_id=p["product_id"])]
            return _Request(f"You want to know {q}.", reads, outputs=[n],
                            answer=f"There are {n} {p['name']} options available right now.",
                            question=f"Also, could you tell me {q}?")
        if kind == "tracking":
            order = rng.choice(shipped)
            tid = order["fulfillments"][0]["tracking_id"][0]
            return _Request(f"You want the tracking number of order {order['order_id']}.",
                            [_act("get_order_details", order_id=order["order_id"])], outputs=[tid],
                            answer=f"The tracking number of order {order['order_id']} is {tid}.",
                            question=f"What is the tracking number of order {order['order_id']}?")
        card = rng.choice(cards)
        bal = str(card["balance"])
        return _Request("You want to know the balance left on your gift card.",
                        [_act("get_user_details", user_id=uid)], outputs=[bal],
                        answer=f"Your gift card {card['id']} has a balance of ${bal}.",
                        question="How much is left on my gift card?")


def generate_tasks(tables: dict, seed: int = 0, num_tasks: int = 200,
                   level: int = 2) -> list[Task]:
    rng = random.Random(f"tasks-{seed}")
    maker = _TaskMaker(tables, rng)
    makers = {"cancel": maker.cancel, "modify_address": maker.modify_address,
              "other_user": maker.other_user,
              "modify_payment": maker.modify_payment, "modify_items": maker.modify_items,
              "return": maker.return_, "exchange": maker.exchange,
              "user_address": maker.user_address, "lookup": maker.lookup}
    mix = _LEVEL_KINDS.get(level, TASK_KINDS)
    kinds, weights = list(mix), list(mix.values())
    user_ids = list(tables["users"])
    tasks = []
    while len(tasks) < num_tasks:
        uid = rng.choice(user_ids)
        # One or two requests whose writes share no order, payment method or user record: each
        # was planned on the initial state (a second gift card charge could overdraw it).
        requests, touched = [], set()
        n = 1 if level < 2 or rng.random() < 0.75 else 2
        for kind in rng.choices(kinds, weights, k=n):
            req = makers[kind](uid)
            if req is None:
                continue
            keys = {str(v) for k, v in req.write.kwargs.items()
                    if k in ("order_id", "payment_method_id", "user_id")} if req.write else set()
            if not keys & touched:
                touched |= keys
                requests.append((kind, req))
        if requests:
            task_id = f"synth-retail-s{seed}-{len(tasks):05d}"
            tasks.append(_assemble(tables, rng, uid, requests, task_id, level))
    return tasks


def _assemble(tables, rng, uid, requests, task_id, level: int = 2) -> Task:
    user = tables["users"][uid]
    first, last = user["name"]["first_name"], user["name"]["last_name"]
    by = rng.choice(["email", "name_zip"])
    if by == "email":
        who = f"You are {first} {last} and your email is {user['email']}."
        actions = [_act("find_user_id_by_email", email=user["email"])]
    else:
        who = f"You are {first} {last} and your zip code is {user['address']['zip']}."
        actions = [_act("find_user_id_by_name_zip", first_name=first, last_name=last,
                        zip=user["address"]["zip"])]
    if level < 2:   # signed in already: no identification
        who, actions = f"You are {first} {last}, signed in to your account.", []
    for _, req in requests:
        if level != 0:   # level 0: the write alone, its arguments all in the user's words
            actions += [a for a in req.reads if a not in actions or a.name != "get_user_details"]
        actions += [req.write] if req.write else []
    reqs = [r for _, r in requests]
    text = " ".join([who] + [r.instruction for r in reqs] + [rng.choice(PERSONAS)])
    return Task(task_id=task_id, domain="retail", user_id=uid, instruction=text, actions=actions,
                outputs=[o for r in reqs for o in r.outputs],
                extra={"source": "synth", "kinds": [k for k, _ in requests], "level": level,
                       "authenticated": level < 2, "lookups": level != 0,
                       "identity": {"by": by, "first_name": first, "last_name": last,
                                    "zip": user["address"]["zip"], "email": user["email"]},
                       "question": " ".join(r.question for r in reqs if r.question),
                       "request": " ".join(r.request for r in reqs if r.request),
                       "answer": " ".join(r.answer for r in reqs if r.answer)})


# ----------------------------------------------------------------------------- language

def describe_action(action: Action, names: dict | None = None) -> str:
    """A verb phrase for a write action ("cancel order #W1 (reason: ...)"), usable after
    "I'd like to" (user) and "I will" (agent). `names` maps ids to readable labels."""
    k, names = action.kwargs, names or {}

    def pay(key="payment_method_id"):
        return names.get(k.get(key), k.get(key))

    def items(key):
        return ", ".join(names.get(i, f"item {i}") for i in k.get(key, []))

    def flights():
        return ", ".join(f"{f['flight_number']} on {f['date']}" for f in k.get("flights", []))

    def people():
        return ", ".join(f"{p['first_name']} {p['last_name']} (born {p['dob']})"
                         for p in k.get("passengers", []))

    match action.name:
        case "cancel_pending_order":
            return f"cancel order {k.get('order_id')} (reason: {k.get('reason')})"
        case "modify_pending_order_address":
            return f"change the shipping address of order {k.get('order_id')} to {_addr_text(k)}"
        case "modify_pending_order_payment":
            return f"switch the payment of order {k.get('order_id')} to {pay()}"
        case "modify_pending_order_items" | "exchange_delivered_order_items":
            verb = "modify" if action.name.startswith("modify") else "exchange"
            return (f"{verb} {items('item_ids')} in order {k.get('order_id')} for "
                    f"{items('new_item_ids')}, settling the price difference with {pay()}")
        case "return_delivered_order_items":
            return (f"return {items('item_ids')} from order {k.get('order_id')}, "
                    f"refunding to {pay()}")
        case "modify_user_address":
            return f"update the default address of user {k.get('user_id')} to {_addr_text(k)}"
        case "cancel_reservation":
            return f"cancel reservation {k.get('reservation_id')}"
        case "book_reservation":
            paid = ", ".join(f"{names.get(p['payment_id'], p['payment_id'])} for ${p['amount']}"
                             for p in k.get("payment_methods", []))
            return (f"book a {k.get('flight_type', '').replace('_', ' ')} {k.get('cabin')} trip "
                    f"from {k.get('origin')} to {k.get('destination')} on {flights()} for "
                    f"{people()}, with {k.get('total_baggages')} checked bags "
                    f"({k.get('nonfree_baggages')} paid), insurance: {k.get('insurance')}, "
                    f"paid with {paid}")
        case "update_reservation_flights":
            return (f"change reservation {k.get('reservation_id')} to {k.get('cabin')} class on "
                    f"{flights()}, settling any difference with {pay('payment_id')}")
        case "update_reservation_baggages":
            return (f"set reservation {k.get('reservation_id')} to {k.get('total_baggages')} "
                    f"checked bags ({k.get('nonfree_baggages')} paid) using {pay('payment_id')}")
        case "update_reservation_passengers":
            return f"update the passengers of reservation {k.get('reservation_id')} to {people()}"
        case "send_certificate":
            return f"send a travel certificate of ${k.get('amount')} to user {k.get('user_id')}"
    return f"run {action.name} with {json.dumps(k)}"


def labels(messages: list[dict]) -> dict[str, str]:
    """Readable labels for the item and payment method ids seen in JSON tool results."""
    names = {}
    for m in messages:
        if m.get("role") != "tool":
            continue
        try:
            obj = json.loads(m.get("content") or "")
        except (json.JSONDecodeError, TypeError):
            continue
        if not isinstance(obj, dict):
            continue
        items = obj.get("items") if isinstance(obj.get("items"), list) else []
        variants = obj.get("variants") if isinstance(obj.get("variants"), dict) else {}
        labelled = [(i, i.get("name")) for i in items if isinstance(i, dict)]
        labelled += [(v, obj.get("name")) for v in variants.values() if isinstance(v, dict)]
        for item, name in labelled:
            if "item_id" in item and isinstance(item.get("options"), dict):
                names.setdefault(item["item_id"], f"the {name} ({_options(item['options'])})")
        methods = obj.get("payment_methods")
        for pm_id, pm in methods.items() if isinstance(methods, dict) else ():
            if isinstance(pm, dict) and pm.get("last_four"):
                names[pm_id] = f"the {pm.get('brand', '')} card ending in {pm['last_four']}"
            elif isinstance(pm, dict):
                names[pm_id] = f"the {str(pm.get('source', '')).replace('_', ' ')} {pm_id}"
    return names


def compact_result(text: str) -> str:
    """A retail record as the lower rungs of the ladder show it: what an agent acts on (ids,
    status, item names, payment methods and their kind), without the rest (options, addresses,
    emails, prices, card brands, fulfilments, amounts). The expert then names items and cards by
    id (`labels` finds no options or last four digits), so what it says can be copied from the
    dialogue. Anything else (errors, plain text) passes as is."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text
    if not isinstance(obj, dict):
        return text
    out = {k: obj[k] for k in ("order_id", "status") if k in obj}
    if isinstance(obj.get("items"), list):
        out["items"] = [{k: i[k] for k in ("item_id", "name") if k in i}
                        for i in obj["items"] if isinstance(i, dict)]
    if isinstance(obj.get("payment_history"), list):
        out["paid_with"] = [p.get("payment_method_id") for p in obj["payment_history"]
                            if isinstance(p, dict) and p.get("transaction_type") == "payment"]
    if isinstance(obj.get("payment_methods"), dict):
        out["payment_methods"] = {
            pm_id: {k: pm[k] for k in ("source",) if k in pm}
            for pm_id, pm in obj["payment_methods"].items() if isinstance(pm, dict)}
    if isinstance(obj.get("orders"), list):
        out["orders"] = obj["orders"]
    if not out:   # not an order or a user: unchanged
        return text
    return json.dumps(out)


# How tool results read to the agent (world.result_view); the database and tau-bench's
# observations are the same either way, only the text the agent (and the transcript) gets differs.
RESULT_VIEWS = {"full": None, "compact": compact_result}


AFFIRMATIVE = re.compile(r"\b(yes|yeah|yep|sure|confirm|confirmed|go ahead|proceed|please do|"
                         r"correct|ok|okay)\b")
NEGATIVE = re.compile(r"\b(no|don't|do not|wait)\b")


def is_affirmative(text: str) -> bool:
    text = text.lower()
    return bool(AFFIRMATIVE.search(text)) and not NEGATIVE.search(text)


# ----------------------------------------------------------------------------- expert

class ExpertAgent:
    """Scripted agent that solves `task` from its gold actions, one message per call.

    Create one per episode (it keeps its place in the script). Gold actions are replayed exactly
    and in order, even those that return errors, so the final database equals the gold replay.
    """

    def __init__(self, task: Task):
        self.task = task
        self.writes = domains.WRITE_TOOLS[task.domain]
        self._script = self._run()
        self._calls = 0
        next(self._script)

    def __call__(self, messages: list[dict], tools: list[dict]) -> AgentReply:
        return AgentReply(message=self._script.send(messages))

    def _say(self, text: str) -> dict:
        return {"role": "assistant", "content": text}

    def _call(self, action: Action) -> dict:
        self._calls += 1
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{self._calls}", "type": "function",
            "function": {"name": action.name, "arguments": json.dumps(action.kwargs)}}]}

    def _run(self):
        task, gold = self.task, self.task.actions
        messages = yield
        if task.domain == "airline":
            if task.user_id not in _last_user(messages):
                messages = yield self._say("Hello! I'd be glad to help with your trip. "
                                           "Could you please tell me your user id?")
            if not any(a.name == "get_user_details" for a in gold):
                messages = yield self._call(_act("get_user_details", user_id=task.user_id))
        elif not (task.extra.get("authenticated") or _identified(task, _last_user(messages))):
            messages = yield self._say("Hello! I can help with that. First, I need to verify "
                                       "your identity: could you give me the email address on "
                                       "your account, or your first name, last name and zip code?")
        looked_up = set()   # every write first shows the record it changes (policy: check status)
        done = []
        for action in gold:
            if action.name in self.writes:
                lookup = _lookup_for(action) if task.extra.get("lookups", True) else None
                if lookup and _key(lookup) not in looked_up:
                    looked_up.add(_key(lookup))
                    messages = yield self._call(lookup)
                what = describe_action(action, labels(messages))
                messages = yield self._say(f"Here are the details: I will {what}. "
                                           "Would you like me to proceed (yes/no)?")
                if not is_affirmative(_last_user(messages)):
                    messages = yield self._say("Just to be sure before I make the change: "
                                               "shall I go ahead (yes/no)?")
                    if not is_affirmative(_last_user(messages)):  # never write without a yes
                        done.append(f"As you asked, I did not {what}")
                        continue
            looked_up.add(_key(action))
            messages = yield self._call(action)
            if action.name in self.writes:
                result = messages[-1].get("content") or ""
                done.append(f"I was unable to {what}: {result}" if result.startswith("Error")
                            else f"Done: your request to {what} has been processed")
        closing = []
        if done:
            closing.append(" ".join(d + "." for d in done))
        if task.extra.get("answer"):
            closing.append(task.extra["answer"])
        elif task.outputs:
            closing.append(f"Here is the information you asked for: {', '.join(task.outputs)}.")
        closing.append("Is there anything else I can help you with?")
        messages = yield self._say(" ".join(closing))
        while True:
            messages = yield self._say("I'm sorry, that is all I can help with in this "
                                       "conversation. Is there anything else?")


def _lookup_for(action: Action) -> Action | None:
    """The read that shows the record a write acts on."""
    k = action.kwargs
    if "order_id" in k:
        return _act("get_order_details", order_id=k["order_id"])
    if "reservation_id" in k:
        return _act("get_reservation_details", reservation_id=k["reservation_id"])
    return None


def _key(action: Action) -> str:
    return action.name + json.dumps(action.kwargs, sort_keys=True)


def _identified(task: Task, text: str) -> bool:
    """Whether the user's text already carries what the gold lookup of their user id uses."""
    finds = [a for a in task.actions if a.name.startswith("find_user_id_by_")]
    return bool(finds) and all(str(v).lower() in text.lower() for v in finds[0].kwargs.values())


def _last_user(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return m.get("content") or ""
    return ""
