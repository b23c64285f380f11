"""A preference task for DPO and KTO: customer messages to a shop's support team, each with
one order number (``#`` and five digits), and support replies that a small chat model
(SmolLM2-135M-Instruct) should learn to write under three house rules it breaks out of the
box:

1. ``order number``: the reply quotes the customer's order number exactly as the message has
   it (``#48213``, not ``48213``, a wrong digit or just "your order");
2. ``promise``: the reply makes none of the promises the shop must not make (any of
   ``FORBIDDEN``, case-insensitive);
3. ``sign-off``: the reply ends with the line ``SIGN_OFF``.

``pairs`` gives ``prompt, chosen, rejected`` rows for DPO: the rejected reply is the chosen
one with one or two rules broken (same greeting, template and length otherwise), so the
only difference that matters is the rules. ``rated`` gives ``prompt, response, good`` rows
for KTO on other messages (another seed), about half of them good. ``follows_rules`` and
``broken_rules`` judge any reply, for instance the tuned model's.

Eight issue types, several message phrasings each (with and without greetings and names,
the order number at the start, middle or end), three or four reply templates per type, each
naming the order in its first sentence (the house style: confirm the order first; with
templates that named it in a later sentence, a tuned model often wrote the others' first
sentence and left the number out: tests/benchmarks/RESULTS.md), so a model has to learn the
rules and not one string.
Replies are short (20-45 words with the sign-off) to keep training cheap. Everything is
generated here from a seed; no external data.
"""

from __future__ import annotations

import random
import re

SIGN_OFF = "— Mia, Northwind Support"
FORBIDDEN = ("guarantee", "promise", "refund today", "within 24 hours", "for free")
RULES = ("order number", "promise", "sign-off")

NAMES = ["Sam", "Priya", "Tom", "Aisha", "Lena", "Marco", "Yuki", "Ben", "Chloe", "Omar",
         "Nina", "Diego", "Hannah", "Kofi", "Elena", "Raj", "Sofia", "Liam", "Mei", "Jonas"]
PRODUCTS = ["desk lamp", "coffee grinder", "kettle", "backpack", "yoga mat", "bedside table",
            "phone case", "blender", "duvet cover", "wool scarf", "water bottle", "alarm clock",
            "oven mitt", "umbrella"]
CLOTHES = {"rain jacket": "SML", "wool jumper": "SML", "linen shirt": "SML", "winter coat": "SML",
           "pair of walking boots": "NUM", "pair of running shoes": "NUM"}
SIZES = {"SML": ["S", "M", "L", "XL"], "NUM": ["38", "39", "40", "41", "42", "43", "44"]}
STREETS = ["14 Elm Street", "7 Harbour Road", "22 Mill Lane", "3 Station Road", "58 Park Avenue",
           "9 Orchard Close", "31 Quarry Hill", "5 Willow Way"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]

# what the customer writes before and after the message; {name} makes the name known
OPENERS = ["", "", "Hi.", "Hello!", "Hi there.", "Good morning.", "Hi, this is {name}.", "Hello, {name} here."]
CLOSERS = ["", "", " Thanks!", " Thanks, {name}", " - {name}", " Cheers, {name}", " Best, {name}"]
GREETS_NAMED = ["Hi {name},", "Hello {name},", "Dear {name},"]
GREETS_ANON = ["Hi there,", "Hello,"]

# per issue type: customer messages, reply templates ({greet} {ref} {Ref} {action} and the case's
# fields), actions that keep the rules and actions that make a forbidden promise
ISSUES = {
    "late delivery": {
        "prompts": [
            "My order {num} was supposed to arrive on {day} and it still hasn't shown up. Can you tell me where it is?",
            "Still waiting for the {product} from order {num}. The tracking page hasn't changed in four days.",
            "Order {num} has been stuck in transit for almost two weeks now. Can you check what is going on?",
            "Where is my {product}? I ordered it ages ago and it still isn't here. The order number is {num}.",
            "Can you guarantee the {product} arrives before {day}? It's a birthday present and the tracking hasn't moved. Order {num}.",
            "The delivery for {num} is late and I need the {product} before the weekend. Any news from the courier?",
        ],
        "replies": [
            "{greet} I'm sorry {ref} is running late. {action}",
            "{greet} thanks for your patience with {ref}: the {product} is still with the courier. {action}",
            "{greet} sorry for the wait on the {product} from {ref}. {action}",
            "{greet} {ref} should have reached you by now, and I'm sorry it hasn't. {action}",
        ],
        "actions": [
            "I've asked the courier for an update and will email you as soon as I hear back.",
            "I've opened a trace with the courier and will share what they find by email.",
            "The tracking shows a delay at the depot, so I'll follow up and keep you posted.",
        ],
        "promises": [
            "I've chased the courier, and I guarantee it will be at your door within 24 hours.",
            "I promise the courier will deliver it first thing tomorrow morning, so please keep an eye out.",
            "If it doesn't turn up by tomorrow, we'll simply send you a new one for free.",
        ],
    },
    "damaged item": {
        "prompts": [
            "The {product} from order {num} arrived with a cracked corner. What should I do now?",
            "My parcel came today but the {product} inside is broken. Order number {num}, please help.",
            "Order {num} arrived damaged. The box was crushed and the {product} is badly scratched.",
            "I opened {num} this morning and the {product} is dented on one side. Not happy about this at all.",
            "Received my {product} yesterday and it is damaged. Can I get a replacement? My order is {num}.",
        ],
        "replies": [
            "{greet} I'm sorry {ref} arrived damaged. {action}",
            "{greet} sorry to hear the {product} from {ref} was damaged in transit. {action}",
            "{greet} thanks for letting us know, {ref} should never have left us like that. {action}",
            "{greet} that's not how the {product} in {ref} should arrive. {action}",
        ],
        "actions": [
            "I've asked the warehouse to check the parcel and will email you the next steps.",
            "Could you send a photo of the damage? Then I can arrange a replacement or a return.",
            "I've logged the damage with the courier and will email you the options shortly.",
        ],
        "promises": [
            "I've ordered a replacement, and I guarantee a new one will reach you within 24 hours.",
            "No need to send anything back; we'll send you a brand-new one for free, I promise.",
            "I'll arrange your refund today so you don't have to wait for the warehouse check.",
        ],
    },
    "wrong size": {
        "prompts": [
            "I ordered the {product} in size {size} but received size {other_size}. It's order {num}. Can I swap it?",
            "Order {num}: the {product} is the wrong size. I asked for {size} and it doesn't fit at all.",
            "The {product} in order {num} doesn't fit, you sent {other_size} instead of {size}. How do I exchange it?",
            "Bit of a problem with my {product}. The label says {other_size} but I ordered {size} ({num}).",
        ],
        "replies": [
            "{greet} sorry, {ref} was packed with size {other_size} instead of {size}. {action}",
            "{greet} I'm sorry the {product} in {ref} doesn't fit. {action}",
            "{greet} thanks for telling us about the size mix-up in {ref}. {action}",
        ],
        "actions": [
            "I've emailed you a returns label so you can send it back and swap it for size {size}.",
            "Please pop it back in the box with the returns slip, and we'll ship size {size} once it arrives.",
            "I've checked stock for size {size}, and the team will email you how to swap it.",
        ],
        "promises": [
            "Keep the one you have for now; I promise size {size} will be with you within 24 hours.",
            "We'll send size {size} out for free today, and the exchange is guaranteed to go smoothly.",
            "I've set it up with the warehouse, and I guarantee the exchange will be sorted by tomorrow evening.",
        ],
    },
    "wrong item": {
        "prompts": [
            "I ordered {a_product} but order {num} contained {a_other}. Can you sort this out for me?",
            "Wrong item in my parcel! {num} should be {a_product}, but I got {a_other} instead.",
            "Order {num} arrived today, but the box had {a_other} in it instead of the {product} I paid for.",
            "You've sent me {a_other} rather than the {product} I ordered. The order number is {num}.",
        ],
        "replies": [
            "{greet} I'm sorry, {ref} should have contained the {product}, not {a_other}. {action}",
            "{greet} apologies for the mix-up with {ref}. {action}",
            "{greet} thanks for flagging the mix-up in {ref}. {action}",
        ],
        "actions": [
            "I've asked the warehouse how it happened and will email you a returns label for the {other}.",
            "Please keep the {other} in its box for now; I'll email you how to send it back.",
            "I've flagged this with the packing team and will confirm the next steps by email.",
        ],
        "promises": [
            "I've sent the right item out, and I guarantee the {product} will arrive within 24 hours.",
            "You can keep the {other} for free, and the {product} will ship to you first thing tomorrow.",
            "To make up for it, I'll process a refund today and send the {product} out as well.",
        ],
    },
    "refund request": {
        "prompts": [
            "I returned the {product} last week. When will I get my money back for order {num}?",
            "Please refund order {num}. The {product} isn't what I expected and I've already sent it back.",
            "I'd like a refund for the {product} from order {num}. I posted it back to you on {day}.",
            "Order {num} went back to you ten days ago and I still haven't seen a refund. What's the hold-up?",
        ],
        "replies": [
            "{greet} thanks for sending the {product} from {ref} back. {action}",
            "{greet} I understand you'd like your money back for {ref}. {action}",
            "{greet} sorry for the wait on the refund for {ref}. {action}",
        ],
        "actions": [
            "Once the warehouse confirms the return, the refund goes back to your original payment method.",
            "I've passed it to our payments team, who will email you when the refund is issued.",
            "I've checked with the returns desk and will update you by email once it is processed.",
        ],
        "promises": [
            "I've approved it myself, so I'll issue your refund today, and that's guaranteed.",
            "I promise the money will be back in your account within 24 hours at the latest.",
            "You'll have the refund today, and the return postage will be paid back to you too.",
        ],
    },
    "address change": {
        "prompts": [
            "I just noticed that order {num} is going to my old address. Can you send it to {street} instead?",
            "Can I change the delivery address for {num}? I've moved, and the new one is {street}.",
            "Please update the shipping address on order {num} to {street}. The {product} hasn't shipped yet, I think.",
            "Moving house this week! Could the {product} (order {num}) go to {street} instead of the old address?",
        ],
        "replies": [
            "{greet} thanks for letting us know about the new address for {ref}. {action}",
            "{greet} I can help with that, {ref} is still with our warehouse team. {action}",
            "{greet} no problem, I've flagged {ref} so the team sees it first. {action}",
        ],
        "actions": [
            "I've asked the warehouse whether it has shipped yet and will confirm by email if the change went through.",
            "If the parcel hasn't left yet I can update it to {street}; I'll confirm by email.",
            "I've sent the new address, {street}, to the dispatch team and will let you know their answer.",
        ],
        "promises": [
            "I've changed it on our side, and I guarantee it will go to {street} instead of the old address.",
            "I promise the courier will have the new address within 24 hours, so it won't go astray.",
            "The change is done, and we'll redeliver for free if it still goes to the old address.",
        ],
    },
    "cancel order": {
        "prompts": [
            "Please cancel order {num}. I ordered the {product} by mistake and don't need it any more.",
            "I changed my mind about the {product}. Can you cancel {num} before it ships, please?",
            "Is it too late to cancel order {num}? I found the {product} cheaper somewhere else.",
            "Cancel {num} please, I accidentally ordered two and only need one {product} after all.",
        ],
        "replies": [
            "{greet} I'm sorry the {product} in {ref} wasn't right for you. {action}",
            "{greet} thanks for letting us know about {ref}. {action}",
            "{greet} understood, the request is noted on {ref}. {action}",
        ],
        "actions": [
            "I've asked the warehouse to stop it before dispatch and will confirm by email.",
            "If it has already shipped, you can return it unopened once it arrives; I'll email you either way.",
            "I've sent the cancellation request to the team and will let you know once they confirm.",
        ],
        "promises": [
            "It's cancelled already, and I promise you'll see the money back in your account very soon.",
            "I guarantee it won't ship, and you'll get the refund today on your original payment card.",
            "Consider it cancelled; your refund will arrive within 24 hours on the card you paid with.",
        ],
    },
    "missing invoice": {
        "prompts": [
            "I need an invoice for order {num} for my company's expenses, but none came with the parcel.",
            "Could you send me the invoice for the {product}? The order number is {num}. Thanks in advance.",
            "The confirmation email for {num} had no invoice attached. Can you send one to me, please?",
            "My accountant is asking for an invoice. Order {num}, the {product} I bought on {day}.",
        ],
        "replies": [
            "{greet} sorry the invoice for {ref} didn't reach you. {action}",
            "{greet} happy to help with the paperwork for {ref}. {action}",
            "{greet} thanks for asking about the invoice for {ref}. {action}",
        ],
        "actions": [
            "I've asked our accounts team to email the invoice to the address on your account.",
            "You can also download it from the Orders page of your account; I've resent the email too.",
            "I've requested a copy from accounts and will forward it to you by email.",
        ],
        "promises": [
            "I've asked accounts for it, and I guarantee the invoice will be in your inbox within 24 hours.",
            "I promise you'll have the invoice in your inbox by this afternoon, ready for your expenses.",
            "I'll send the invoice over shortly, and the extra copy is yours for free, of course.",
        ],
    },
}
TYPES = list(ISSUES)
# which rules a bad reply breaks: each rule alone twice as often as each pair
KINDS = [("order number",), ("promise",), ("sign-off",)] * 2 + [
    ("order number", "promise"), ("order number", "sign-off"), ("promise", "sign-off")]
BAD_SIGN_OFFS = ["Best regards,\nMia", "— Mia", "Kind regards,\nNorthwind Support",
                 "- Mia, Northwind Support", "Mia, Northwind Support", "Thanks,\nMia from Northwind",
                 "— Mia, Northwind Support\nHave a lovely day!", "Have a great day!"]

ORDER_RE = re.compile(r"#\d{5}(?!\d)")
FORBIDDEN_RE = [re.compile(r"\s+".join(map(re.escape, f.split())), re.IGNORECASE) for f in FORBIDDEN]


def broken_rules(prompt: str, answer: str) -> list[str]:
    """Names of the house rules ``answer`` breaks as a reply to ``prompt``, in ``RULES`` order."""
    broken = []
    if any(not re.search(re.escape(num) + r"(?!\d)", answer) for num in ORDER_RE.findall(prompt)):
        broken.append("order number")
    if any(f.search(answer) for f in FORBIDDEN_RE):
        broken.append("promise")
    if not answer.rstrip().endswith(SIGN_OFF):
        broken.append("sign-off")
    return broken


def follows_rules(prompt: str, answer: str) -> bool:
    return not broken_rules(prompt, answer)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _case(rng: random.Random, issue: str, number: int) -> dict:
    """One customer message of type ``issue`` and the fields its replies use."""
    spec = ISSUES[issue]
    if issue == "wrong size":
        product = rng.choice(sorted(CLOTHES))
        size, other_size = rng.sample(SIZES[CLOTHES[product]], 2)
    else:
        product, size, other_size = rng.choice(PRODUCTS), "", ""
    other = rng.choice([p for p in PRODUCTS if p != product])
    f = {"num": f"#{number}", "product": product, "other": other, "a_product": _a(product),
         "a_other": _a(other), "size": size, "other_size": other_size,
         "street": rng.choice(STREETS), "day": rng.choice(DAYS), "name": rng.choice(NAMES)}
    opener = rng.choice(OPENERS)
    closer = rng.choice([c for c in CLOSERS if "{name}" not in opener or "{name}" not in c])
    body = rng.choice(spec["prompts"]).format(**f)
    f["prompt"] = " ".join(p for p in (opener.format(**f), body) if p) + closer.format(**f)
    named = "{name}" in opener + closer
    f["greet"] = rng.choice(GREETS_NAMED if named else GREETS_ANON).format(**f)
    f["template"] = rng.randrange(len(spec["replies"]))
    f["action"] = rng.randrange(len(spec["actions"]))
    f["your"] = rng.random() < 0.3  # "your order #N" rather than "order #N"
    return f


def _reply(rng: random.Random, issue: str, f: dict, breaks=()) -> str:
    """The reply for case ``f``, keeping every rule except those in ``breaks``."""
    spec = ISSUES[issue]
    if "order number" in breaks:
        digits = list(f["num"][1:])
        i = rng.choice([j for j in range(4) if digits[j] != digits[j + 1]] or [4])
        if i < 4:  # swap two neighbouring digits
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
        else:
            digits[4] = str((int(digits[4]) + 1) % 10)
        ref = rng.choice(["your order", "the order", "order #" + "".join(digits), "order " + f["num"][1:]])
    else:
        ref = ("your order " if f["your"] else "order ") + f["num"]
    if "promise" in breaks:
        action = rng.choice(spec["promises"])
    else:
        action = spec["actions"][f["action"]]
    sign = rng.choice(BAD_SIGN_OFFS) if "sign-off" in breaks else SIGN_OFF
    fields = dict(f, ref=ref, Ref=ref[0].upper() + ref[1:])
    fields["action"] = action.format(**fields)
    return spec["replies"][f["template"]].format(**fields) + "\n" + sign


def pairs(n: int = 200, seed: int = 0):
    """``prompt, chosen, rejected`` rows for DPO: chosen keeps all three rules, rejected is the
    same reply with one or two of them broken."""
    import pandas as pd

    rng = random.Random(seed)
    out = [{"prompt": f["prompt"], "chosen": _reply(rng, issue, f), "rejected": _reply(rng, issue, f, KINDS[i % len(KINDS)])}
           for i, issue, f in _cases(rng, n)]
    return pd.DataFrame(out).sample(frac=1, random_state=seed).reset_index(drop=True)


def _cases(rng: random.Random, n: int):
    """(i, issue type, case) for ``n`` messages, each with its own order number."""
    numbers = rng.sample(range(10000, 100000), n)
    for i in range(n):
        issue = TYPES[i % len(TYPES)]
        yield i, issue, _case(rng, issue, numbers[i])


def rated(n: int = 200, seed: int = 1):
    """``prompt, response, good`` rows for KTO: half the responses keep all rules, the other
    half break one or two; the prompts come from ``seed``, not ``pairs``'s seed."""
    import pandas as pd

    rng = random.Random(seed)
    out = []
    for i, issue, f in _cases(rng, n):
        good = i % 2 == 0
        breaks = () if good else KINDS[(i // 2) % len(KINDS)]
        out.append({"prompt": f["prompt"], "response": _reply(rng, issue, f, breaks), "good": good})
    frame = pd.DataFrame(out).sample(frac=1, random_state=seed).reset_index(drop=True)
    frame["good"] = frame["good"].astype(bool)
    return frame


if __name__ == "__main__":
    from collections import Counter

    def words(text):
        return len(text.split())

    p, r = pairs(), rated()
    print(f"pairs: {len(p)} rows")
    for row in p.head(3).itertuples():
        print(f"\nPROMPT: {row.prompt}\nCHOSEN:\n{row.chosen}\nREJECTED {broken_rules(row.prompt, row.rejected)}:\n{row.rejected}")
    print(f"\nrated: {len(r)} rows, {int(r['good'].sum())} good")
    for row in r.head(3).itertuples():
        print(f"\nPROMPT: {row.prompt}\nRESPONSE (good={row.good}):\n{row.response}")

    assert r["good"].dtype == bool
    for frame in (p, r):
        nums = [ORDER_RE.findall(q) for q in frame["prompt"]]
        assert all(len(x) == 1 for x in nums) and all(q.count("#") == 1 for q in frame["prompt"])
        assert len({x[0] for x in nums}) == len(frame), "order numbers not unique"
        assert all(12 <= words(q) <= 35 for q in frame["prompt"]), frame["prompt"].map(words).describe()
    assert not set(p["prompt"]) & set(r["prompt"]), "pairs and rated share prompts"
    replies = list(p["chosen"]) + list(p["rejected"]) + list(r["response"])
    assert all(20 <= words(a) <= 45 for a in replies), sorted(map(words, replies))[::50]
    assert all(follows_rules(q, a) for q, a in zip(p["prompt"], p["chosen"]))
    assert not any(follows_rules(q, a) for q, a in zip(p["prompt"], p["rejected"]))
    assert all(follows_rules(q, a) == g for q, a, g in zip(r["prompt"], r["response"], r["good"]))

    for name, prompts, bad in (("pairs rejected", p["prompt"], p["rejected"]),
                               ("rated bad", r.loc[~r["good"], "prompt"], r.loc[~r["good"], "response"])):
        counts = Counter(rule for q, a in zip(prompts, bad) for rule in broken_rules(q, a))
        two = sum(len(broken_rules(q, a)) == 2 for q, a in zip(prompts, bad))
        shares = ", ".join(f"{rule} {counts[rule] / len(bad):.0%}" for rule in RULES)
        print(f"\n{name}: {len(bad)} rows break {shares}; {two / len(bad):.0%} break two")
    print(f"words: prompt {p['prompt'].map(words).min()}-{p['prompt'].map(words).max()}, "
          f"chosen mean {p['chosen'].map(words).mean():.1f}, rejected mean {p['rejected'].map(words).mean():.1f}, "
          f"replies {min(map(words, replies))}-{max(map(words, replies))}")
    print("issue types:", len(TYPES), "; all checks passed")
