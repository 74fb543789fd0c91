"""Builds the tiny byte-level BPE tokenizer of the tiny CPU model, deterministically.

    python -m tarl_jax.models.make_tiny_tokenizer [--out DIR]

The corpus is generated here from a fixed seed: tool-use dialogues in Qwen's chat format (the
renderer of tokenizer.py), customer-service phrases, tau-bench-like ids ('#W1234567',
'noah_brown_6181'), emails, JSON tool calls and results, and arithmetic. The model is Qwen's
recipe at small scale: NFC, Qwen's pre-tokenizer split, byte-level BPE over all 256 bytes (any
text encodes), then Qwen's special tokens appended as single ids, so the chat format is the same.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import re

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from tarl_jax.models import tokenizer as chat

VOCAB_SIZE = 2048  # special tokens included
# Control tokens (skipped by decode(skip_special_tokens=True)); then the markup tokens, which
# Qwen3 also keeps as plain added tokens so that decoded text still shows the calls.
SPECIAL = (chat.ENDOFTEXT, chat.IM_START, chat.IM_END, chat.AUDIO, chat.AUDIO_BOS, chat.AUDIO_EOS)
MARKUP = (chat.TOOL_CALL, chat.TOOL_CALL_END, chat.TOOL_RESPONSE, chat.TOOL_RESPONSE_END,
          chat.THINK, chat.THINK_END)
# Qwen2/3's pre-tokenizer split: contractions, letter runs, single digits, punctuation, newlines.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")

FIRST = "noah emma liam olivia mia yusuf sofia ethan aarav isabella lucas amelia omar chen fatima".split()
LAST = "brown smith garcia kim patel nguyen rossi muller silva khan lopez ito ahmed wilson".split()
ITEMS = ("t-shirt", "laptop", "water bottle", "desk lamp", "hiking boots", "backpack", "headphones",
         "coffee maker", "jigsaw puzzle", "office chair", "smart watch", "bicycle", "tea kettle")
STATUSES = ("pending", "processed", "delivered", "cancelled", "exchange requested", "return requested")
AIRPORTS = ("JFK", "LAX", "SFO", "ORD", "ATL", "DFW", "SEA", "BOS", "MIA", "DEN", "PHX", "EWR")
CITIES = ("Austin", "Denver", "Seattle", "Boston", "Chicago", "Phoenix", "San Diego", "Columbus")
PHRASES = (
    "I can help you with that.", "Could you please provide your email address?",
    "Thank you! Let me look up your account.", "Before I proceed, please confirm (yes/no).",
    "Your order has been cancelled and the refund will be processed in 5-7 business days.",
    "I'm sorry, but I can't modify a delivered order.", "Is there anything else I can help with?",
    "I have transferred you to a human agent.", "Please confirm the new shipping address.",
    "The exchange has been requested; you will receive an email with instructions.",
)
# Everyday words, for free-form notes and user chatter beyond the scripted lines.
WORDS = """the be to of and a in that have it for not on with he as you do at this but his by from they
we say her she or an will my one all would there their what so up out if about who get which go me when
make can like time no just him know take people into year your good some could them see other than then
now look only come its over think also back after use two how our work first well way even new want
because any these give day most us is was are been has had were said did having may should must might
order orders item items product products price prices refund refunds payment method card gift credit
paypal balance account address shipping shipped delivery delivered pending processed cancel cancelled
return returned exchange exchanged modify modified change changed confirm confirmed confirmation
reason mistake needed option options color colour size small medium large black white red blue green
grey silver gold leather cotton wool plastic metal glass wood steel waterproof wireless battery
capacity weight inch inches liters grams kilograms pounds dollars cents total subtotal tax discount
flight flights reservation reservations passenger passengers seat seats cabin economy basic business
class baggage bags luggage insurance upgrade downgrade origin destination departure arrival airport
date dates morning afternoon evening tonight tomorrow yesterday week weeks month months monday tuesday
wednesday thursday friday saturday sunday january february march april may june july august september
october november december hello hi thanks thank please sorry help assist happy glad unfortunately
policy policies allowed allow cannot unable able available unavailable only once twice each every
customer agent human transfer user username email phone number zip code city state street avenue road
apartment suite country name first last identity verify verified authenticate details information
status detail list lists find found search searched lookup calculate calculation result results
answer answers question questions problem problems solve solution step steps number numbers integer
sum product difference quotient remainder fraction fractions percent percentage equation equations
value values variable variables square root prime factor factors multiple multiples divisible
triangle circle area perimeter angle degrees probability expected average mean median minimum maximum""".split()
POLICY = (
    "You should not make up any information or procedures not provided by the user or the tools.",
    "Before taking any action that updates the database, obtain explicit user confirmation (yes).",
    "You can only help one user per conversation and must authenticate the user identity first.",
    "An order can only be cancelled if its status is 'pending'; the refund goes to the original payment method.",
    "Exchange or modify order tools can only be called once per order, so collect all items first.",
    "Transfer to a human agent only if the request cannot be handled within the scope of your actions.",
    "Each reservation can use at most one travel certificate, one credit card and three gift cards.",
    "Basic economy flights cannot be modified; other reservations can change flights without changing the origin.",
)
USER_LINES = (
    "Hi, I want to cancel my order.", "I'd like to return the {item} I bought.",
    "Can you change the address for order {order}?", "My email is {email}.",
    "Yes, please go ahead.", "No, that's all. Thanks!", "I want to exchange the {item} for a bigger one.",
    "My name is {name} and my zip code is {zip}.", "What's the status of {order}?",
)
# (name, description, {argument: (type, description)}) of retail/airline-like tools.
TOOLS = (
    ("find_user_id_by_email", "Find user id by email.", {"email": ("string", "The email of the user.")}),
    ("find_user_id_by_name_zip", "Find user id by first name, last name, and zip code.",
     {"first_name": ("string", "The first name."), "last_name": ("string", "The last name."),
      "zip": ("string", "The zip code, such as '12345'.")}),
    ("get_user_details", "Get the details of a user, including their orders.",
     {"user_id": ("string", "The user id, such as 'sara_doe_496'.")}),
    ("get_order_details", "Get the status and details of an order.",
     {"order_id": ("string", "The order id, such as '#W0000000'.")}),
    ("cancel_pending_order", "Cancel a pending order.",
     {"order_id": ("string", "The order id."), "reason": ("string", "'no longer needed' or 'ordered by mistake'.")}),
    ("return_delivered_order_items", "Return some items of a delivered order.",
     {"order_id": ("string", "The order id."), "item_ids": ("array", "The item ids to return."),
      "payment_method_id": ("string", "The payment method id, such as 'gift_card_0000000'.")}),
    ("modify_pending_order_address", "Modify the shipping address of a pending order.",
     {"order_id": ("string", "The order id."), "address1": ("string", "The first line."),
      "city": ("string", "The city."), "zip": ("string", "The zip code.")}),
    ("search_direct_flight", "Search direct flights between two cities on a date.",
     {"origin": ("string", "IATA code, such as 'JFK'."), "destination": ("string", "IATA code."),
      "date": ("string", "The date in 'YYYY-MM-DD' format.")}),
    ("calculate", "Calculate the result of a mathematical expression.",
     {"expression": ("string", "The expression, such as '2 + 2'.")}),
    ("transfer_to_human_agents", "Transfer the user to a human agent, with a summary.",
     {"summary": ("string", "A summary of the user's issue.")}),
)


def _tool_schema(name: str, description: str, params: dict) -> dict:
    properties = {}
    for arg, (kind, text) in params.items():
        properties[arg] = {"type": kind, "description": text}
        if kind == "array":
            properties[arg]["items"] = {"type": "string"}
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(params)}}}


def _dialogue(rng: random.Random) -> list[dict]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    user_id = f"{first}_{last}_{rng.randrange(1000, 10000)}"
    email = f"{first}.{last}{rng.randrange(100)}@example.com"
    orders = [f"#W{rng.randrange(10**7):07d}" for _ in range(rng.randint(1, 3))]
    fill = dict(item=rng.choice(ITEMS), order=orders[0], email=email,
                name=f"{first.title()} {last.title()}", zip=f"{rng.randrange(10**5):05d}")
    messages = [{"role": "system", "content": "You are a helpful customer service agent. " + rng.choice(PHRASES)},
                {"role": "user", "content": rng.choice(USER_LINES).format(**fill)}]
    for turn in range(rng.randint(1, 4)):
        name, _, params = rng.choice(TOOLS)
        args = {arg: rng.choice([email, user_id, orders[-1], fill["zip"], rng.choice(CITIES),
                                 f"{rng.randrange(10**10):010d}"]) for arg in params}
        reasoning = f"The user {user_id} asked about {orders[0]}; I should call {name}." if rng.random() < 0.3 else None
        messages.append({"role": "assistant", "content": rng.choice(["", rng.choice(PHRASES)]),
                         "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}],
                         **({"reasoning_content": reasoning} if reasoning else {})})
        result = {"order_id": orders[-1], "user_id": user_id, "status": rng.choice(STATUSES),
                  "items": [{"name": rng.choice(ITEMS), "item_id": f"{rng.randrange(10**10):010d}",
                             "price": round(rng.uniform(5, 900), 2)} for _ in range(rng.randint(1, 3))],
                  "address": {"city": rng.choice(CITIES), "zip": fill["zip"]}}
        messages.append({"role": "tool", "content": json.dumps(result) if rng.random() < 0.9
                         else f"Error: order {orders[-1]} not found"})
        messages.append({"role": "assistant", "content": rng.choice(PHRASES)})
        messages.append({"role": "user", "content": rng.choice(USER_LINES).format(**fill)})
    return messages


def _notes(rng: random.Random) -> list[dict]:
    """Free text: the policy, and user chatter made of everyday and domain words."""
    chatter = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
    first, last = rng.choice(FIRST), rng.choice(LAST)
    flight = (f"Flight HAT{rng.randrange(1000):03d} from {rng.choice(AIRPORTS)} to {rng.choice(AIRPORTS)} "
              f"on 2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} at {rng.randint(0, 23):02d}:00, "
              f"reservation {rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randrange(10**5):05d}, "
              f"{rng.choice(['economy', 'basic_economy', 'business'])}, {first.title()} {last.title()}.")
    return [{"role": "system", "content": " ".join(rng.sample(POLICY, 3))},
            {"role": "user", "content": chatter.capitalize() + ". " + flight}]


def _math(rng: random.Random) -> list[dict]:
    a, b, c = rng.randrange(2, 1000), rng.randrange(2, 100), rng.randrange(1, 50)
    op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
    question = (f"A shop sells {a} items on Monday and {b} items on Tuesday. Compute {a} {op} {b}, "
                f"then add {c}. Put the final answer in \\boxed{{}}.")
    reasoning = f"First, {a} {op} {b} = {value}. Then {value} + {c} = {value + c}."
    answer = f"We have $\\frac{{{2 * value}}}{{2}} + {c} = {value + c}$, so the answer is $\\boxed{{{value + c}}}$."
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": answer, "reasoning_content": reasoning}]


def corpus(n_dialogues: int = 600, n_math: int = 600, n_notes: int = 1500, seed: int = 0) -> list[str]:
    """Rendered chat text, cut at the special tokens (those are never merged into BPE pieces)."""
    rng = random.Random(seed)
    tools = [_tool_schema(*t) for t in TOOLS]
    texts = [chat.render_text(_dialogue(rng), tools if i % 10 == 0 else None, add_generation_prompt=True)
             for i in range(n_dialogues)]
    texts += [chat.render_text(_math(rng)) for _ in range(n_math)]
    texts += [chat.render_text(_notes(rng)) for _ in range(n_notes)]
    split = re.compile("|".join(re.escape(t) for t in SPECIAL + MARKUP))
    return [piece for text in texts for piece in split.split(text) if piece]


def build() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIAL) - len(MARKUP), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in MARKUP])
    return tok


def save(tok: tokenizers.Tokenizer, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    # Enough for transformers' AutoTokenizer; no chat_template: tokenizer.py renders the format.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": chat.IM_END,
              "pad_token": chat.ENDOFTEXT, "bos_token": None, "unk_token": None,
              "add_bos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 32768, "split_special_tokens": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=chat.tiny_tokenizer_dir())
    args = parser.parse_args()
    tok = build()
    save(tok, args.out)
    print(f"wrote {args.out} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
