"""A generated, labelled PII evaluation set: sentences from templates with entity values filled in,
every entity's character span known by construction.

The templates and value formats here are written for evaluation only and kept apart from the
examples the guards were tuned on (tests/unit/test_pii.py): different sentence frames, other
value shapes (international phone formats, IPv6, IBANs of several countries, cards of several
brands and separators), and hard negatives that look like PII but are not (order numbers, dates,
version strings, cards failing the Luhn check, IBANs failing theirs).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field


@dataclass
class Sample:
    text: str
    spans: list[tuple[str, int, int]] = field(default_factory=list)
    """(entity, start, end) of every true entity."""


FIRST = ["maria", "li", "oskar", "amara", "dev", "noor", "kenji", "fatima", "luca", "ines", "tomas", "ada"]
LAST = ["santos", "chen", "berg", "okafor", "patel", "haddad", "sato", "rahman", "rossi", "silva", "novak", "king"]
DOMAINS = ["mailbox.org", "uni-heidelberg.de", "corp.example.com", "fastmail.fm", "health.gov.uk", "startup.io"]
TLDS = ["com", "org", "net", "io", "de", "co.uk"]


def luhn_digit(digits: str) -> str:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d)
        if i % 2 == 0:
            n *= 2
            n -= 9 if n > 9 else 0
        total += n
    return str((10 - total % 10) % 10)


def card(rng: random.Random, valid: bool = True) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16)])
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    check = luhn_digit(body)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    number = body + check
    sep = rng.choice(["", " ", "-"])
    if length == 15:
        return sep.join([number[:4], number[4:10], number[10:]])
    return sep.join(number[i : i + 4] for i in range(0, 16, 4))


def iban(rng: random.Random, valid: bool = True) -> str:
    country, length = rng.choice([("DE", 22), ("FR", 27), ("GB", 22), ("NL", 18), ("ES", 24), ("IT", 27)])
    if country == "GB":
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + "".join(
            rng.choice(string.digits) for _ in range(14)
        )
    elif country == "NL":
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + "".join(
            rng.choice(string.digits) for _ in range(10)
        )
    elif country == "IT":
        bban = rng.choice(string.ascii_uppercase) + "".join(rng.choice(string.digits) for _ in range(22))
    else:
        bban = "".join(rng.choice(string.digits) for _ in range(length - 4))
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    if not valid:
        check = (check + rng.randint(1, 50)) % 97 + 2
    raw = f"{country}{check:02d}{bban}"
    return " ".join(raw[i : i + 4] for i in range(0, len(raw), 4)) if rng.random() < 0.6 else raw


def phone(rng: random.Random) -> str:
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    area = str(rng.randint(201, 989))
    return rng.choice(
        [
            f"({area}) {rng.randint(200, 999)}-{d(4)}",
            f"{area}-{rng.randint(200, 999)}-{d(4)}",
            f"+1 {area} {rng.randint(200, 999)} {d(4)}",
            f"+44 20 {rng.randint(7000, 8999)} {d(4)}",
            f"+49 30 {d(8)}",
            f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
        ]
    )


def ssn(rng: random.Random) -> str:
    area = rng.choice([n for n in range(1, 900) if n != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def email(rng: random.Random) -> str:
    local = rng.choice(
        [
            f"{rng.choice(FIRST)}.{rng.choice(LAST)}",
            f"{rng.choice(FIRST)}{rng.randint(1, 99)}",
            f"{rng.choice(FIRST)[0]}{rng.choice(LAST)}+billing",
        ]
    )
    return f"{local}@{rng.choice(DOMAINS)}"


def ip(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    return ":".join(f"{rng.randint(0, 0xFFFF):x}" for _ in range(8))


def url(rng: random.Random) -> str:
    host = f"{rng.choice(['www.', 'portal.', ''])}{rng.choice(LAST)}-{rng.choice(['shop', 'labs', 'clinic'])}"
    path = rng.choice(["", "/account/settings", "/reset?token=af93k2", "/docs/v2/intro"])
    return f"https://{host}.{rng.choice(TLDS)}{path}"


GENERATORS = {
    "EMAIL_ADDRESS": email,
    "PHONE_NUMBER": phone,
    "CREDIT_CARD": card,
    "IBAN_CODE": iban,
    "US_SSN": ssn,
    "IP_ADDRESS": ip,
    "URL": url,
}

TEMPLATES = {
    "EMAIL_ADDRESS": ["Forward the invoice to {} before Friday.", "Her work address is {}, not the old one."],
    "PHONE_NUMBER": ["Ring the front desk on {} after nine.", "The courier left a number, {}, on the slip."],
    "CREDIT_CARD": ["Charge it to the card ending in the digits {} please.", "Payment method on file: {}."],
    "IBAN_CODE": ["Wire the deposit to account {} by the 3rd.", "Refunds go back to {} within a week."],
    "US_SSN": ["The applicant's social security number is {}.", "SSN {} was entered on the tax form."],
    "IP_ADDRESS": ["Requests from {} were rate limited overnight.", "The printer answers at {} on the lab network."],
    "URL": ["Reset your password at {} within the hour.", "The vendor's portal, {}, was down again."],
}

NEGATIVES = [
    lambda r: (
        f"Order number {r.randint(10_000_000, 99_999_999)} shipped on 2024-0{r.randint(1, 9)}-1{r.randint(0, 9)}."
    ),
    lambda r: f"Upgrade to version {r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 99)} to get the fix.",
    lambda r: f"The meeting moved to {r.randint(1, 12)}/{r.randint(1, 28)}/2025 at {r.randint(1, 12)} pm.",
    lambda r: f"That card, {card(r, valid=False)}, was declined as mistyped.",
    lambda r: f"The account {iban(r, valid=False)} failed validation.",
    lambda r: f"The warehouse holds {r.randint(100, 999)} {r.randint(100, 999)} units in aisle {r.randint(1, 40)}.",
    lambda r: "Ask the team lead about the rollout plan on Monday.",
    lambda r: (
        f"Invoice INV-{r.randint(1000, 9999)}-{r.randint(10, 99)} totals ${r.randint(10, 999)}.{r.randint(10, 99)}."
    ),
]


def generate(n_per_entity: int = 60, n_negative: int = 120, seed: int = 7) -> list[Sample]:
    """Positive samples for each entity (one or two entities per sentence) and negatives."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    for entity, make in GENERATORS.items():
        for i in range(n_per_entity):
            value = make(rng)
            template = TEMPLATES[entity][i % len(TEMPLATES[entity])]
            start = template.index("{}")
            text = template.format(value)
            spans = [(entity, start, start + len(value))]
            if i % 3 == 0:  # a second, different entity after it
                other = rng.choice([e for e in GENERATORS if e != entity])
                extra = GENERATORS[other](rng)
                prefix = f"{text} Also noted: "
                spans.append((other, len(prefix), len(prefix) + len(extra)))
                text = f"{prefix}{extra}."
            samples.append(Sample(text, spans))
    for i in range(n_negative):
        samples.append(Sample(NEGATIVES[i % len(NEGATIVES)](rng)))
    return samples
