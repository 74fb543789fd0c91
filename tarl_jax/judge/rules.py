"""Rule judge: per-turn scores from the gold actions alone, deterministic, no model.

It is the offline judge of the embedded default and the fallback of the LLM judge. Rules, applied
to each agent turn (assistant message) in order; a turn with several tool calls takes the worst
of their verdicts (-1 before +1 before 0):

+1  a tool call equal to a not-yet-credited gold action: same name, same arguments. Arguments
    compare as values (dict key order never matters; 5 == 5.0; "5" != 5). Extra keys inside
    nested records (a flight with an "origin") are ignored, as tau-bench's tools read those
    records by key; extra or missing top-level arguments are not. Lists compare in order,
    except where tau-bench's database ends up the same in any order: the item ids of
    `return_delivered_order_items` (stored sorted) and the (item_id, new_item_id) pairs of
    `exchange_delivered_order_items` / `modify_pending_order_items`. `transfer_to_human_agents`
    matches on its name alone (its summary is free text). Each gold action credits one call.
+1  a text-only turn that says a required output for the first time (tau-bench's check: the
    output, lower-cased, occurs in the lower-cased message with commas removed; text beside a
    tool call never reaches the user in tau-bench, so it does not count).
-1  a write call (one that changes the database) that no gold action asks for, or a gold write
    tool called with other arguments than every remaining gold call of that tool.
-1  `transfer_to_human_agents` when the gold actions do not transfer.
-1  (only if no other turn has a -1) a gold write the agent never made, or else a required
    output it never said: on the turn that attempted that write and was rejected, else on the
    last agent turn not scored +1 (the turn that closed the episode without it), else on the
    last turn.
 0  read-only calls not in the gold actions, calls with arguments that are not a JSON object,
    other text turns, and writes the environment rejected ("Error: ..." result, nothing changed:
    a mistake that cost nothing, which the agent may still correct).
At most one -1: the first offending turn in dialogue order takes it (later ones usually cascade
from it); later offenders score 0 with "cascading" in the reason and are listed in
`meta["cascading"]`. `meta["negative_kind"]` names the -1's rule (wrong_args, unrequested_write,
transfer, missing_write, missing_output), `meta["offences"]` every turn's that would have
taken one (cascading included; not the missing_* ones); gold actions never matched are in
`meta["unmatched_gold"]`, outputs never said in `meta["unsaid_outputs"]`.
"""
from __future__ import annotations

import json
from typing import Any

from tarl_jax.judge.base import (TRANSFER_TOOL, Call, GoldCall, Judgement, agent_turn_positions,
                                 dialogue_messages, task_view, text_of, tool_calls, write_tools)

_PAIRED_ITEMS = ("exchange_delivered_order_items", "modify_pending_order_items")


def args_match(name: str, call: dict, gold: dict) -> bool:
    """True iff tau-bench's tools treat the call's arguments as the gold's (see module doc)."""
    if name == TRANSFER_TOOL:
        return True
    return _match(_canonical(name, call), _canonical(name, gold), top=True)


def _canonical(name: str, kwargs: dict) -> dict:
    kw = dict(kwargs)
    items, new_items = kw.get("item_ids"), kw.get("new_item_ids")
    if name in _PAIRED_ITEMS and isinstance(items, list) and isinstance(new_items, list) \
            and len(items) == len(new_items):
        del kw["item_ids"], kw["new_item_ids"]
        kw["item_pairs"] = sorted([str(a), str(b)] for a, b in zip(items, new_items))
    elif name == "return_delivered_order_items" and isinstance(items, list):
        kw["item_ids"] = sorted(map(str, items))
    return kw


def _match(x: Any, gold: Any, top: bool = False) -> bool:
    if isinstance(x, bool) or isinstance(gold, bool):
        return x is gold
    if isinstance(x, (int, float)) and isinstance(gold, (int, float)):
        return float(x) == float(gold)
    if isinstance(x, dict) and isinstance(gold, dict):
        # Top-level extra keys make the tool call fail; nested records (flights, passengers,
        # payment methods) are read by key, so extra keys there change nothing.
        if top and set(x) != set(gold):
            return False
        return all(k in x and _match(x[k], v) for k, v in gold.items())
    if isinstance(x, list) and isinstance(gold, list):
        return len(x) == len(gold) and all(_match(a, b) for a, b in zip(x, gold))
    return type(x) is type(gold) and x == gold


def _fmt(call: Call | GoldCall) -> str:
    return f"{call.name}({json.dumps(call.kwargs, sort_keys=True)})"


def _said(output: str, text: str) -> bool:
    return output.lower() in text.lower().replace(",", "")


def judge(task: Any, dialogue: Any, domain: str | None = None) -> Judgement:
    messages, ep_domain = dialogue_messages(dialogue)
    tv = task_view(task, domain or ep_domain)
    writes = write_tools(tv.domain)
    gold_transfers = any(a.name == TRANSFER_TOOL for a in tv.actions)
    remaining = list(tv.actions)          # gold actions not yet credited
    outputs_left = list(tv.outputs)
    rejected_attempt: dict[str, int] = {}  # write name -> first turn whose attempt was rejected

    scores, reasons, offences = [], [], []  # offences: (turn, kind) of would-be -1s, in order
    for t, pos in enumerate(agent_turn_positions(messages)):
        calls = tool_calls(messages, pos)
        verdicts = [_call_verdict(c, remaining, writes, gold_transfers) for c in calls]
        for c, v in zip(calls, verdicts):
            if v[0] == 0 and c.name in writes and c.result is not None and c.result.startswith("Error"):
                rejected_attempt.setdefault(c.name, t)
        # Text next to a tool call never reaches the user in tau-bench (the call is the action).
        said = [] if calls else [o for o in outputs_left if _said(o, text_of(messages[pos]))]
        for o in said:
            outputs_left.remove(o)
        if said:
            verdicts.append((1, f"says required output(s) {said}", ""))
        if not verdicts:
            verdicts.append((0, "text turn", ""))
        worst = min(verdicts, key=lambda v: v[0])
        if worst[0] == -1:
            offences.append((t, worst[2]))
            scores.append(-1)
        else:
            scores.append(max(v[0] for v in verdicts))
        reasons.append("; ".join(v[1] for v in verdicts))

    for t, _ in offences[1:]:
        scores[t] = 0
        reasons[t] += f" (cascading: the -1 went to turn {offences[0][0]})"
    missing = [a for a in remaining if a.name in writes]
    kind = offences[0][1] if offences else None
    if not offences and (missing or outputs_left) and scores:
        t = rejected_attempt.get(missing[0].name) if missing else None
        if t is None:
            not_pos = [i for i, s in enumerate(scores) if s != 1]
            t = not_pos[-1] if not_pos else len(scores) - 1
        scores[t] = -1
        kind = "missing_write" if missing else "missing_output"
        reasons[t] += (f"; gold write {_fmt(missing[0])} never made" if missing else
                       f"; required output(s) {outputs_left} never said")
    meta = {"negative_kind": kind, "cascading": [t for t, _ in offences[1:]],
            "offences": [k for _, k in offences],   # every would-be -1's rule, in order
            "unmatched_gold": [_fmt(a) for a in remaining], "unsaid_outputs": outputs_left}
    return Judgement(scores=scores, reasons=reasons, source="rule", meta=meta)


def _call_verdict(call: Call, remaining: list[GoldCall], writes: frozenset[str],
                  gold_transfers: bool) -> tuple[int, str, str]:
    """(score, reason, kind of -1 or "") of one call; credits (removes) the gold it matches."""
    if call.kwargs is None:
        return 0, f"{call.name}: arguments are not a JSON object", ""
    for g in remaining:
        if g.name == call.name and args_match(call.name, call.kwargs, g.kwargs):
            remaining.remove(g)
            return 1, f"matches gold {_fmt(g)}", ""
    if call.name == TRANSFER_TOOL:
        return (0, "transfer repeated", "") if gold_transfers else (
            -1, "transfers to a human agent; the gold actions do not", "transfer")
    if call.name not in writes:
        return 0, f"read-only {call.name} not in gold", ""
    if call.result is not None and call.result.startswith("Error"):
        return 0, f"write {_fmt(call)} rejected by the environment, nothing changed", ""
    same_tool = [g for g in remaining if g.name == call.name]
    if same_tool:
        diff = sorted(k for k in set(call.kwargs) | set(same_tool[0].kwargs)
                      if call.kwargs.get(k) != same_tool[0].kwargs.get(k))
        return -1, f"gold write {call.name} with wrong arguments {diff}: {_fmt(call)}", "wrong_args"
    return -1, f"write {_fmt(call)} that no gold action asks for", "unrequested_write"
