"""Domain registry: tables, tools, schemas and write tools of each (domain, flavor).

A tool is `fn(data: Db, **kwargs) -> str | None`. It mirrors the reference implementation's
control flow and Python operations step by step, so that valid calls give byte-identical
answers and invalid ones fail at the same point with the same exception text (tau-bench turns
any exception into "Error: {e}"). Only tools in `write_tools` may write, and `Env.call` runs
them atomically: an exception undoes every write the call made.
"""
from __future__ import annotations

import ast
import dataclasses
import operator
from typing import Any, Callable

Extractor = Callable[[dict], Any]  # record -> value of a derived (queryable) column


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    name: str
    flavor: str                                   # "v1" (tau-bench) | "tau2" (tau2-bench)
    tables: dict[str, dict[str, Extractor]]
    tools: dict[str, Callable[..., Any]]
    schemas: list[dict]
    write_tools: frozenset[str]
    terminate_tools: frozenset[str] = frozenset({"transfer_to_human_agents"})
    unknown_tool: str = "Unknown action {name}"   # the answer to a call of no such tool
    # tau2: table -> function giving a loaded record tau2's model shape (see models.py)
    normalize: dict[str, Callable[[dict], dict]] | None = None


def field(*path: str, lower: bool = False) -> Extractor:
    """Extractor for a derived column: the value at `path` (None where absent)."""
    def extract(record: dict) -> Any:
        for key in path:
            if not isinstance(record, dict):
                return None
            record = record.get(key)
        return record.lower() if lower and isinstance(record, str) else record
    return extract


def tool(owner: str, method: bool = False) -> Callable:
    """Name a tool as the reference names it, so TypeErrors for missing or unexpected arguments
    read the same: tau-bench's `Owner.invoke()`, or with `method` tau2's `Owner.tool_name()`."""
    def wrap(fn):
        fn.__qualname__ = f"{owner}.{fn.__name__ if method else 'invoke'}"
        return fn
    return wrap


def text_or(data, table: str, key: Any, missing: str) -> str:
    """A record's answer text (stored as exactly `json.dumps(record)`), else `missing`."""
    text = data.text(table, key)
    return missing if text is None else text


def need(data, table: str, key: Any, message: str) -> dict:
    """The record, or ValueError(message): tau2's way of failing a lookup."""
    record = data.get(table, key)
    if record is None:
        raise ValueError(message)
    return record


def need_text(data, table: str, key: Any, message: str) -> str:
    """`need` for answers: a tau2 world stores exactly `json.dumps(model.model_dump())`."""
    text = data.text(table, key)
    if text is None:
        raise ValueError(message)
    return text


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_BITS = 100_000  # far beyond float range, so only the time-bomb inputs are cut short


def _evaluate(node: ast.AST) -> Any:
    # Python's own evaluation order and arithmetic, minus the unbounded big-int growth with
    # which eval("9**9**9") would hang the sandbox. The characters tau-bench admits allow only
    # numbers, `...`, `()`, + - * / // ** and parentheses.
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_evaluate(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if (isinstance(node.op, ast.Pow) and type(left) is int and type(right) is int
                and abs(left) > 1 and right * left.bit_length() > _MAX_BITS):
            raise OverflowError("int too large to convert to float")
        value = _BINARY[type(node.op)](left, right)
        if type(value) is int and value.bit_length() > _MAX_BITS:
            raise OverflowError("int too large to convert to float")
        return value
    raise SyntaxError(f"unsupported expression {type(node).__name__}")


def calculate_value(expression: str) -> str:
    """tau-bench's calculator result (raises like its eval does)."""
    if not all(char in "0123456789+-*/(). " for char in expression):
        raise ValueError("Invalid characters in expression")
    return str(round(float(_evaluate(ast.parse(expression, "<string>", "eval"))), 2))


@tool("Calculate")
def calculate(data, expression: str) -> str:
    if not all(char in "0123456789+-*/(). " for char in expression):
        return "Error: invalid characters in expression"
    try:
        return calculate_value(expression)
    except Exception as e:
        return f"Error: {e}"


@tool("Think")
def think(data, thought: str) -> str:
    return ""


@tool("TransferToHumanAgents")
def transfer_to_human_agents(data, summary: str) -> str:
    return "Transfer successful"


def get(domain: str, flavor: str = "v1") -> DomainSpec:
    if domain == "retail":
        from tarl_jax.sandbox.domains import retail as mod
    elif domain == "airline":
        from tarl_jax.sandbox.domains import airline as mod
    else:
        raise KeyError(f"unknown domain {domain!r} (known: retail, airline)")
    specs = {"v1": mod.V1, "tau2": mod.TAU2}
    if flavor not in specs:
        raise KeyError(f"unknown flavor {flavor!r} for {domain} (known: v1, tau2)")
    return specs[flavor]


WRITE_TOOLS: dict[str, frozenset[str]] = {
    "retail": frozenset({"cancel_pending_order", "exchange_delivered_order_items",
                         "modify_pending_order_address", "modify_pending_order_items",
                         "modify_pending_order_payment", "modify_user_address",
                         "return_delivered_order_items"}),
    "airline": frozenset({"book_reservation", "cancel_reservation", "send_certificate",
                          "update_reservation_baggages", "update_reservation_flights",
                          "update_reservation_passengers"}),
}


def gold_writes(task) -> list:
    """The task's gold actions that change the database (none: doing nothing is right)."""
    tools = WRITE_TOOLS.get(task.domain, frozenset())
    return [a for a in task.actions if a.name in tools]
