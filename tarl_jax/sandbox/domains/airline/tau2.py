"""tau2-bench airline tools: tau-bench's, reworked by tau2 (failures raise "Error: <Message>",
records come back in the model shape, booking takes seats, a flight change also sets the
cabin, searches return model-shaped flights, `get_flight_status` added, `think` removed)."""
from __future__ import annotations

import copy
import json

from tarl_jax.sandbox.domains import calculate_value, need, need_text, tool
from tarl_jax.sandbox.domains.airline.tools import AIRPORTS
from tarl_jax.sandbox.domains.models import Models

_CABIN = ("lit", "business", "economy", "basic_economy")
_BY_CABIN = ("dict", int)
MODELS = Models({
    "Name": [("first_name", str), ("last_name", str)],
    "Address": [("address1", str), ("address2", ("opt", str)), ("city", str), ("country", str),
                ("state", str), ("zip", str)],
    "Payment": [("payment_id", str), ("amount", int)],
    "CreditCard": [("source", str), ("id", str), ("brand", str), ("last_four", str)],
    "GiftCard": [("source", str), ("id", str), ("amount", float)],
    "Certificate": [("source", str), ("id", str), ("amount", float)],
    "PaymentMethod": {"by": "source", "credit_card": "CreditCard", "gift_card": "GiftCard",
                      "certificate": "Certificate"},
    "Passenger": [("first_name", str), ("last_name", str), ("dob", str)],
    "Available": [("status", str), ("available_seats", _BY_CABIN), ("prices", _BY_CABIN)],
    "OnTime": [("status", str), ("estimated_departure_time_est", str),
               ("estimated_arrival_time_est", str)],
    "Flying": [("status", str), ("actual_departure_time_est", str),
               ("estimated_arrival_time_est", str)],
    "Landed": [("status", str), ("actual_departure_time_est", str),
               ("actual_arrival_time_est", str)],
    "Cancelled": [("status", str)],
    "Delayed": [("status", str), ("estimated_departure_time_est", str),
                ("estimated_arrival_time_est", str)],
    "FlightDateStatus": {"by": "status", "available": "Available", "on time": "OnTime",
                         "flying": "Flying", "landed": "Landed", "cancelled": "Cancelled",
                         "delayed": "Delayed"},
    "Flight": [("flight_number", str), ("origin", str), ("destination", str),
               ("scheduled_departure_time_est", str), ("scheduled_arrival_time_est", str),
               ("dates", ("dict", "FlightDateStatus"))],
    "DirectFlight": [("flight_number", str), ("origin", str), ("destination", str),
                     ("status", str), ("scheduled_departure_time_est", str),
                     ("scheduled_arrival_time_est", str), ("date", ("opt", str)),
                     ("available_seats", _BY_CABIN), ("prices", _BY_CABIN)],
    "ReservationFlight": [("flight_number", str), ("origin", str), ("destination", str),
                          ("date", str), ("price", int)],
    "FlightInfo": [("flight_number", str), ("date", str)],
    "User": [("user_id", str), ("name", "Name"), ("address", "Address"), ("email", str),
             ("dob", str), ("payment_methods", ("dict", "PaymentMethod")),
             ("saved_passengers", ("list", "Passenger")),
             ("membership", ("lit", "gold", "silver", "regular")),
             ("reservations", ("list", str))],
    "Reservation": [("reservation_id", str), ("user_id", str), ("origin", str),
                    ("destination", str), ("flight_type", ("lit", "round_trip", "one_way")),
                    ("cabin", _CABIN), ("flights", ("list", "ReservationFlight")),
                    ("passengers", ("list", "Passenger")),
                    ("payment_history", ("list", "Payment")), ("created_at", str),
                    ("total_baggages", int), ("nonfree_baggages", int),
                    ("insurance", ("lit", "yes", "no")), ("status", ("opt", ("lit", "cancelled")))],
})
TABLE_MODELS = {"users": "User", "flights": "Flight", "reservations": "Reservation"}

method = tool("AirlineTools", method=True)



def _reservation(data, reservation_id):
    return need(data, "reservations", reservation_id, f"Reservation {reservation_id} not found")


def _user(data, user_id):
    return need(data, "users", user_id, f"User {user_id} not found")


class _Flights:
    """Flights loaded during one call, shared so that two segments on one flight-date see
    (and take seats from) the same record, as tau2's model objects do."""

    def __init__(self, data):
        self.data, self.loaded = data, {}

    def flight(self, flight_number):
        if flight_number not in self.loaded:
            self.loaded[flight_number] = need(self.data, "flights", flight_number,
                                               f"Flight {flight_number} not found")
        return self.loaded[flight_number]

    def instance(self, flight_number, date):
        dates = self.flight(flight_number)["dates"]
        if date not in dates:
            raise ValueError(f"Flight {flight_number} not found on date {date}")
        return dates[date]

    def bookable(self, info, cabin, n_passengers):
        """The date entry of an available flight with enough seats, else ValueError."""
        number, date = info["flight_number"], info["date"]
        instance = self.instance(number, date)
        if instance["status"] != "available":
            raise ValueError(f"Flight {number} not available on date {date}")
        if instance["available_seats"][cabin] < n_passengers:
            raise ValueError(f"Not enough seats on flight {number}")
        return instance


def _models(name, values):
    # tau2 converts argument lists only when every element is an object.
    if all(isinstance(v, dict) for v in values):
        return [MODELS.build(name, v) for v in values]
    return values


def _segment(flight, date, price):
    return MODELS.build("ReservationFlight", {
        "flight_number": flight["flight_number"], "origin": flight["origin"],
        "destination": flight["destination"], "date": date, "price": price})


@method
def book_reservation(data, user_id, origin, destination, flight_type, cabin, flights,
                     passengers, payment_methods, total_baggages, nonfree_baggages, insurance):
    flights = _models("FlightInfo", flights)
    passengers = _models("Passenger", passengers)
    payment_methods = _models("Payment", payment_methods)
    user = _user(data, user_id)
    reservation_id = next((r for r in ("HATHAT", "HATHAU", "HATHAV")
                           if data.text("reservations", r) is None), None)
    if reservation_id is None:
        raise ValueError("Too many reservations")
    reservation = MODELS.build("Reservation", {
        "reservation_id": reservation_id, "user_id": user_id, "origin": origin,
        "destination": destination, "flight_type": flight_type, "cabin": cabin, "flights": [],
        "passengers": copy.deepcopy(passengers), "payment_history": copy.deepcopy(payment_methods),
        "created_at": "2024-05-15T15:00:00", "total_baggages": total_baggages,
        "nonfree_baggages": nonfree_baggages, "insurance": insurance})
    table, total_price, taken = _Flights(data), 0, []
    for info in flights:
        flight = table.flight(info["flight_number"])
        instance = table.bookable(info, cabin, len(passengers))
        price = instance["prices"][cabin]
        reservation["flights"].append(_segment(flight, info["date"], price))
        taken.append(instance)
        total_price += price * len(passengers)
    if insurance == "yes":
        total_price += 30 * len(passengers)
    total_price += 50 * nonfree_baggages

    methods = user["payment_methods"]
    for payment in payment_methods:
        payment_id, amount = payment["payment_id"], payment["amount"]
        if payment_id not in methods:
            raise ValueError(f"Payment method {payment_id} not found")
        if methods[payment_id]["source"] in {"gift_card", "certificate"}:
            if methods[payment_id]["amount"] < amount:
                raise ValueError(f"Not enough balance in payment method {payment_id}")
    total_payment = sum(payment["amount"] for payment in payment_methods)
    if total_payment != total_price:
        raise ValueError(f"Payment amount does not add up, total price is {total_price}, "
                         f"but paid {total_payment}")
    for payment in payment_methods:
        if methods[payment["payment_id"]]["source"] == "gift_card":
            methods[payment["payment_id"]]["amount"] -= payment["amount"]
        elif methods[payment["payment_id"]]["source"] == "certificate":
            methods.pop(payment["payment_id"])
    for instance in taken:
        instance["available_seats"][cabin] -= len(passengers)
    for number, flight in table.loaded.items():
        data.put("flights", number, flight)
    data.put("reservations", reservation_id, reservation)
    user["reservations"].append(reservation_id)
    data.put("users", user_id, user)
    return json.dumps(reservation)


@method
def calculate(data, expression):
    return calculate_value(expression)


@method
def cancel_reservation(data, reservation_id):
    reservation = _reservation(data, reservation_id)
    refunds = [MODELS.build("Payment", {"payment_id": p["payment_id"], "amount": -p["amount"]})
               for p in reservation["payment_history"]]
    reservation["payment_history"].extend(refunds)
    reservation["status"] = "cancelled"  # tau2 does not give the seats back either
    data.put("reservations", reservation_id, reservation)
    return json.dumps(reservation)



@method
def get_reservation_details(data, reservation_id):
    return need_text(data, "reservations", reservation_id, f"Reservation {reservation_id} not found")


@method
def get_user_details(data, user_id):
    return need_text(data, "users", user_id, f"User {user_id} not found")


@method
def list_all_airports(data):
    return json.dumps([{"iata": code, "city": city} for code, city in AIRPORTS.items()])


def _direct(data, date, origin=None, destination=None, leave_after=None):
    where = {k: v for k, v in (("origin", origin), ("destination", destination)) if v is not None}
    results = []
    for _, flight in data.scan("flights", **where):
        if (date in flight["dates"] and flight["dates"][date]["status"] == "available"
                and (leave_after is None
                     or flight["scheduled_departure_time_est"] >= leave_after)):
            instance = flight["dates"][date]
            results.append(MODELS.build("DirectFlight", {
                **{k: flight[k] for k in ("flight_number", "origin", "destination",
                                          "scheduled_departure_time_est",
                                          "scheduled_arrival_time_est")},
                "status": "available", "available_seats": instance["available_seats"],
                "prices": instance["prices"]}))
    return results


@method
def search_direct_flight(data, origin, destination, date):
    return json.dumps(_direct(data, date, origin, destination))


@method
def search_onestop_flight(data, origin, destination, date):
    results = []
    for first in _direct(data, date, origin=origin):
        first["date"] = date
        # Day after `date` without zero padding, as tau2 writes it.
        date2 = (f"2024-05-{int(date[-2:]) + 1}"
                 if "+1" in first["scheduled_arrival_time_est"] else date)
        for second in _direct(data, date2, first["destination"], destination,
                              leave_after=first["scheduled_arrival_time_est"]):
            second["date"] = date2
            results.append([first, second])
    return json.dumps(results)


@method
def send_certificate(data, user_id, amount):
    user = _user(data, user_id)
    for number in [3221322, 3221323, 3221324]:  # at most three per task
        payment_id = f"certificate_{number}"
        if payment_id not in user["payment_methods"]:
            user["payment_methods"][payment_id] = MODELS.build(
                "Certificate", {"id": payment_id, "amount": amount, "source": "certificate"})
            data.put("users", user_id, user)
            return f"Certificate {payment_id} added to user {user_id} with amount {amount}."
    raise ValueError("Too many certificates")


def _pay_for_update(data, user_id, user, payment_id, total_price):
    """Charge a change to a stored payment method; the Payment record, or None when free."""
    if payment_id not in user["payment_methods"]:
        raise ValueError("Payment method not found")
    method_ = user["payment_methods"][payment_id]
    if method_["source"] == "certificate":
        raise ValueError("Certificate cannot be used to update reservation")
    if method_["source"] == "gift_card" and method_["amount"] < total_price:
        raise ValueError("Gift card balance is not enough")
    if method_["source"] == "gift_card":
        method_["amount"] -= total_price
        data.put("users", user_id, user)
    if total_price != 0:
        return MODELS.build("Payment", {"payment_id": payment_id, "amount": total_price})
    return None


@method
def transfer_to_human_agents(data, summary):
    return "Transfer successful"


@method
def update_reservation_baggages(data, reservation_id, total_baggages, nonfree_baggages,
                                payment_id):
    reservation = _reservation(data, reservation_id)
    user = _user(data, reservation["user_id"])
    total_price = 50 * max(0, nonfree_baggages - reservation["nonfree_baggages"])
    payment = _pay_for_update(data, reservation["user_id"], user, payment_id, total_price)
    if payment is not None:
        reservation["payment_history"].append(payment)
    reservation["total_baggages"] = total_baggages
    reservation["nonfree_baggages"] = nonfree_baggages
    data.put("reservations", reservation_id, reservation)
    return json.dumps(reservation)


@method
def update_reservation_flights(data, reservation_id, cabin, flights, payment_id):
    flights = _models("FlightInfo", flights)
    reservation = _reservation(data, reservation_id)
    user = _user(data, reservation["user_id"])
    n_passengers = len(reservation["passengers"])
    table, total_price, segments = _Flights(data), 0, []
    for info in flights:
        kept = next((f for f in reservation["flights"]
                     if f["flight_number"] == info["flight_number"]
                     and f["date"] == info["date"] and cabin == reservation["cabin"]), None)
        if kept:
            total_price += kept["price"] * n_passengers
            segments.append(kept)
            continue
        flight = table.flight(info["flight_number"])
        instance = table.bookable(info, cabin, n_passengers)
        segment = _segment(flight, info["date"], instance["prices"][cabin])
        total_price += segment["price"] * n_passengers
        segments.append(segment)
    total_price -= sum(f["price"] for f in reservation["flights"]) * n_passengers
    payment = _pay_for_update(data, reservation["user_id"], user, payment_id, total_price)
    if payment is not None:
        reservation["payment_history"].append(payment)
    reservation["flights"] = segments
    reservation["cabin"] = cabin
    data.put("reservations", reservation_id, reservation)
    return json.dumps(reservation)


@method
def update_reservation_passengers(data, reservation_id, passengers):
    passengers = _models("Passenger", passengers)
    reservation = _reservation(data, reservation_id)
    if len(passengers) != len(reservation["passengers"]):
        raise ValueError("Number of passengers does not match")
    reservation["passengers"] = copy.deepcopy(passengers)
    data.put("reservations", reservation_id, reservation)
    return json.dumps(reservation)


@method
def get_flight_status(data, flight_number, date):
    return _Flights(data).instance(flight_number, date)["status"]


TOOLS = [book_reservation, calculate, cancel_reservation, get_reservation_details,
         get_user_details, list_all_airports, search_direct_flight, search_onestop_flight,
         send_certificate, transfer_to_human_agents, update_reservation_baggages,
         update_reservation_flights, update_reservation_passengers, get_flight_status]
