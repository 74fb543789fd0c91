"""Airline: users, flights, reservations (tau-bench v1 tools; tau2 variants in `tau2`)."""
import functools

from tarl_jax.sandbox.domains import (DomainSpec, WRITE_TOOLS, calculate, field, think,
                                      transfer_to_human_agents)
from tarl_jax.sandbox.domains.airline import tau2, tools as t
from tarl_jax.sandbox.domains.airline.schemas import SCHEMAS

TABLES = {
    "users": {},
    "flights": {"origin": field("origin"), "destination": field("destination")},
    "reservations": {"user_id": field("user_id"), "status": field("status")},
}

V1 = DomainSpec(
    name="airline", flavor="v1", tables=TABLES, schemas=SCHEMAS,
    write_tools=WRITE_TOOLS["airline"],
    tools={fn.__name__: fn for fn in [
        t.book_reservation, calculate, t.cancel_reservation, t.get_reservation_details,
        t.get_user_details, t.list_all_airports, t.search_direct_flight,
        t.search_onestop_flight, t.send_certificate, think, transfer_to_human_agents,
        t.update_reservation_baggages, t.update_reservation_flights,
        t.update_reservation_passengers]})

# tau2 ships no tools.json: its schemas come from docstrings. We offer the v1 schemas of the
# tools both share (same arguments) and our own for the one tau2 added.
_GET_FLIGHT_STATUS = {"type": "function", "function": {
    "name": "get_flight_status",
    "description": "Get the status of a flight on a date (such as 'available', 'landed', "
                   "'cancelled', 'delayed', 'flying' or 'on time').",
    "parameters": {"type": "object", "properties": {
        "flight_number": {"type": "string", "description": "The flight number, such as 'HAT001'."},
        "date": {"type": "string", "description": "The date of the flight in the format "
                                                  "'YYYY-MM-DD', such as '2024-05-01'."}},
        "required": ["flight_number", "date"]}}}
_V1_SCHEMAS = {s["function"]["name"]: s for s in SCHEMAS}

TAU2 = DomainSpec(
    name="airline", flavor="tau2", tables=TABLES, write_tools=WRITE_TOOLS["airline"],
    tools={fn.__name__: fn for fn in tau2.TOOLS},
    schemas=[_V1_SCHEMAS.get(fn.__name__, _GET_FLIGHT_STATUS) for fn in tau2.TOOLS],
    unknown_tool="Error: Tool '{name}' not found.",
    normalize={table: functools.partial(tau2.MODELS.build, model)
               for table, model in tau2.TABLE_MODELS.items()})
