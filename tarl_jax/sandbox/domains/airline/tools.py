"""tau-bench v1 airline tools over the SQLite store (same checks, effects and strings).

As in tau-bench, booking and changing flights do not touch seat counts (flights are read-only).
"""
from __future__ import annotations

import copy
import json

from tarl_jax.sandbox.domains import text_or, tool

AIRPORTS = {
    "SFO": "San Francisco", "JFK": "New York", "LAX": "Los Angeles", "ORD": "Chicago",
    "DFW": "Dallas", "DEN": "Denver", "SEA": "Seattle", "ATL": "Atlanta", "MIA": "Miami",
    "BOS": "Boston", "PHX": "Phoenix", "IAH": "Houston", "LAS": "Las Vegas", "MCO": "Orlando",
    "EWR": "Newark", "CLT": "Charlotte", "MSP": "Minneapolis", "DTW": "Detroit",
    "PHL": "Philadelphia", "LGA": "LaGuardia",
}


def _price_flight(data, flight: dict, cabin, passengers) -> str | None:
    """Fill a requested segment's price/origin/destination from the flight table, or an error."""
    flight_number = flight["flight_number"]
    flight_data = data.get("flights", flight_number)
    if flight_data is None:
        return f"Error: flight {flight_number} not found"
    if flight["date"] not in flight_data["dates"]:
        return f"Error: flight {flight_number} not found on date {flight['date']}"
    date_data = flight_data["dates"][flight["date"]]
    if date_data["status"] != "available":
        return f"Error: flight {flight_number} not available on date {flight['date']}"
    if date_data["available_seats"][cabin] < len(passengers):
        return f"Error: not enough seats on flight {flight_number}"
    flight["price"] = date_data["prices"][cabin]
    flight["origin"] = flight_data["origin"]
    flight["destination"] = flight_data["destination"]
    return None


@tool("BookReservation")
def book_reservation(data, user_id, origin, destination, flight_type, cabin, flights,
                     passengers, payment_methods, total_baggages, nonfree_baggages, insurance):
    user = data.get("users", user_id)
    if user is None:
        return "Error: user not found"
    # At most three bookings per task, with fixed ids (tau-bench's convention).
    reservation_id = next((r for r in ("HATHAT", "HATHAU") if data.text("reservations", r) is None),
                          "HATHAV")
    reservation = {
        "reservation_id": reservation_id, "user_id": user_id, "origin": origin,
        "destination": destination, "flight_type": flight_type, "cabin": cabin,
        "flights": copy.deepcopy(flights), "passengers": passengers,
        "payment_history": payment_methods, "created_at": "2024-05-15T15:00:00",
        "total_baggages": total_baggages, "nonfree_baggages": nonfree_baggages,
        "insurance": insurance,
    }
    total_price = 0
    for flight in reservation["flights"]:
        error = _price_flight(data, flight, cabin, passengers)
        if error:
            return error
        total_price += flight["price"] * len(passengers)
    if insurance == "yes":
        total_price += 30 * len(passengers)
    total_price += 50 * nonfree_baggages

    methods = user["payment_methods"]
    for payment in payment_methods:
        payment_id, amount = payment["payment_id"], payment["amount"]
        if payment_id not in methods:
            return f"Error: payment method {payment_id} not found"
        if methods[payment_id]["source"] in ["gift_card", "certificate"]:
            if methods[payment_id]["amount"] < amount:
                return f"Error: not enough balance in payment method {payment_id}"
    paid = sum(payment["amount"] for payment in payment_methods)
    if paid != total_price:
        return (f"Error: payment amount does not add up, total price is {total_price}, "
                f"but paid {sum(payment['amount'] for payment in payment_methods)}")

    for payment in payment_methods:
        payment_id, amount = payment["payment_id"], payment["amount"]
        if methods[payment_id]["source"] == "gift_card":
            methods[payment_id]["amount"] -= amount
        elif methods[payment_id]["source"] == "certificate":
            del methods[payment_id]
    data.put("reservations", reservation_id, reservation)
    user["reservations"].append(reservation_id)
    data.put("users", user_id, user)
    return json.dumps(reservation)


@tool("CancelReservation")
def cancel_reservation(data, reservation_id):
    reservation = data.get("reservations", reservation_id)
    if reservation is None:
        return "Error: reservation not found"
    refunds = [{"payment_id": p["payment_id"], "amount": -p["amount"]}
               for p in reservation["payment_history"]]
    reservation["payment_history"].extend(refunds)
    reservation["status"] = "cancelled"
    data.put("reservations", reservation_id, reservation)
    return json.dumps(reservation)


@tool("GetReservationDetails")
def get_reservation_details(data, reservation_id):
    return text_or(data, "reservations", reservation_id, "Error: user not found")  # sic


@tool("GetUserDetails")
def get_user_details(data, user_id):
    return text_or(data, "users", user_id, "Error: user not found")


@tool("ListAllAirports")
def list_all_airports(data):
    return json.dumps(AIRPORTS)


def _on_date(flight: dict, date) -> dict:
    """A search result: the flight without its calendar, plus that date's entry."""
    result = {k: v for k, v in flight.items() if k != "dates"}
    result.update(flight["dates"][date])
    return result


@tool("SearchDirectFlight")
def search_direct_flight(data, origin, destination, date):
    results = []
    for _, flight in data.scan("flights", origin=origin, destination=destination):
        if date in flight["dates"] and flight["dates"][date]["status"] == "available":
            results.append(_on_date(flight, date))
    return json.dumps(results)


@tool("SearchOnestopFlight")
def search_onestop_flight(data, origin, destination, date):
    results = []
    arrivals = list(data.scan("flights", destination=destination))
    for _, flight1 in data.scan("flights", origin=origin):
        for _, flight2 in arrivals:
            if flight1["destination"] != flight2["origin"]:
                continue
            # Day after `date` without zero padding, as tau-bench writes it.
            date2 = (f"2024-05-{int(date[-2:]) + 1}"
                     if "+1" in flight1["scheduled_arrival_time_est"] else date)
            if flight1["scheduled_arrival_time_est"] > flight2["scheduled_departure_time_est"]:
                continue
            if date in flight1["dates"] and date2 in flight2["dates"]:
                if (flight1["dates"][date]["status"] == "available"
                        and flight2["dates"][date2]["status"] == "available"):
                    result1 = _on_date(flight1, date)
                    result1["date"] = date
                    # tau-bench merges the second leg's entry for `date`, not `date2`.
                    result2 = _on_date(flight2, date)
                    result2["date"] = date2
                    results.append([result1, result2])
    return json.dumps(results)


@tool("SendCertificate")
def send_certificate(data, user_id, amount):
    user = data.get("users", user_id)
    if user is None:
        return "Error: user not found"
    for number in [3221322, 3221323, 3221324]:  # at most three per task
        payment_id = f"certificate_{number}"
        if payment_id not in user["payment_methods"]:
            user["payment_methods"][payment_id] = {
                "source": "certificate", "amount": amount, "id": payment_id}
            data.put("users", user_id, user)
            return f"Certificate {payment_id} added to user {user_id} with amount {amount}."
    return None


def _payment_error(method: dict, total_price) -> str | None:
    if method["source"] == "certificate":
        return "Error: certificate cannot be used to update reservation"
    if method["source"] == "gift_card" and method["amount"] < total_price:
        return "Error: gift card balance is not enough"
    return None


@tool("UpdateReservationBaggages")
def update_reservation_baggages(data, reservation_id, total_baggages, nonfree_baggages,
                                payment_id):
    reservation = data.get("reservations", reservation_id)
    if reservation is None:
        return "Error: reservation not found"
    total_price = 50 * max(0, nonfree_baggages - reservation["nonfree_baggages"])
    user = data.require("users", reservation["user_id"])
    if payment_id not in user["payment_methods"]:
        return "Error: payment method not found"
    method = user["payment_methods"][payment_id]
    error = _payment_error(method, total_price)
    if error:
        return error

    reservation["total_baggages"] = total_baggages
    reservation["nonfree_baggages"] = nonfree_baggages
    if method["source"] == "gift_card":
        method["amount"] -= total_price
        data.put("users", reservation["user_id"], user)
    if total_price != 0:
        reservation["payment_history"].append({"payment_id": payment_id, "amount": total_price})
    data.put("reservations", reservation_id, reservation)
    return json.dumps(reservation)


@tool("UpdateReservationFlights")
def update_reservation_flights(data, reservation_id, cabin, flights, payment_id):
    reservation = data.get("reservations", reservation_id)
    if reservation is None:
        return "Error: reservation not found"
    n_passengers = len(reservation["passengers"])
    total_price = 0
    flights = copy.deepcopy(flights)
    for flight in flights:
        # A segment already booked in the same cabin keeps its old price.
        kept = [f for f in reservation["flights"]
                if f["flight_number"] == flight["flight_number"] and f["date"] == flight["date"]
                and cabin == reservation["cabin"]]
        if kept:
            total_price += kept[0]["price"] * n_passengers
            flight["price"] = kept[0]["price"]
            flight["origin"] = kept[0]["origin"]
            flight["destination"] = kept[0]["destination"]
            continue
        error = _price_flight(data, flight, cabin, reservation["passengers"])
        if error:
            return error
        total_price += flight["price"] * n_passengers
    total_price -= sum(flight["price"] for flight in reservation["flights"]) * n_passengers

    user = data.require("users", reservation["user_id"])
    if payment_id not in user["payment_methods"]:
        return "Error: payment method not found"
    method = user["payment_methods"][payment_id]
    error = _payment_error(method, total_price)
    if error:
        return error

    if method["source"] == "gift_card":
        method["amount"] -= total_price
        data.put("users", reservation["user_id"], user)
    reservation["flights"] = flights
    if total_price != 0:
        reservation["payment_history"].append({"payment_id": payment_id, "amount": total_price})
    data.put("reservations", reservation_id, reservation)
    return json.dumps(reservation)


@tool("UpdateReservationPassengers")
def update_reservation_passengers(data, reservation_id, passengers):
    reservation = data.get("reservations", reservation_id)
    if reservation is None:
        return "Error: reservation not found"
    if len(passengers) != len(reservation["passengers"]):
        return "Error: number of passengers does not match"
    reservation["passengers"] = passengers
    data.put("reservations", reservation_id, reservation)
    return json.dumps(reservation)
