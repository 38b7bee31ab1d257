"""The arithmetic generator's problem templates, read back from their text: each pattern takes the
numbers out of a problem and says, with its own formula, what the answer and the number of
operations must be. Nothing here calls the generator, so its answers are checked against
arithmetic done apart from it."""

from __future__ import annotations

import re
from typing import Callable

NAME = r"(?P<name>[A-Z][a-z]+)"


def _share(total: int, friends: int) -> int:
    assert total % friends == 0, f"{total} sweets do not share equally among {friends} friends"
    return total // friends


# template -> (pattern of the whole text, answer from the numbers in the order they appear, operations)
TEMPLATES: dict[str, tuple[str, Callable[..., int], int]] = {
    # one operation
    "marbles_win": (NAME + r" has (\d+) marbles and wins (\d+) more\. How many marbles does (?P=name) have now\?",
                    lambda a, b: a + b, 1),
    "stickers_give": (NAME + r" has (\d+) stickers and gives (\d+) of them away\. How many stickers are left\?",
                      lambda a, b: a - b, 1),
    "pencil_boxes": (r"A box holds (\d+) pencils\. How many pencils are there in (\d+) boxes\?",
                     lambda a, b: a * b, 1),
    "sweets_share": (r"(\d+) sweets are shared equally among (\d+) friends\. How many sweets does each friend get\?",
                     _share, 1),
    # several operations
    "marbles_win_give": (NAME + r" has (\d+) marbles, wins (\d+) more in a game and then gives (\d+) to a friend\. "
                         r"How many marbles does (?P=name) have now\?", lambda a, b, c: a + b - c, 2),
    "pencils_hand_out": (r"A box holds (\d+) pencils\. A teacher buys (\d+) boxes and hands out (\d+) pencils\. "
                         r"How many pencils are left\?", lambda a, b, c: a * b - c, 2),
    "pages_read": (NAME + r" reads (\d+) pages on Monday, (\d+) times as many on Tuesday and none on Wednesday\. "
                   r"How many pages does (?P=name) read over the three days\?", lambda a, b: a + a * b, 2),
    "sweets_share_eat": (r"(\d+) friends share (\d+) sweets equally, and then each of them eats (\d+)\. "
                         r"How many sweets does each friend have left\?", lambda n, s, e: _share(s, n) - e, 2),
    "tickets": (r"Adult tickets cost \$(\d+) and child tickets cost \$(\d+)\. A family buys (\d+) adult tickets and "
                r"(\d+) child tickets\. How many dollars do they pay in total\?",
                lambda adult, child, adults, children: adult * adults + child * children, 3),
    "tank": (r"A tank holds (\d+) litres of water\. It leaks (\d+) litres an hour for (\d+) hours and is then "
             r"refilled with (\d+) litres\. How many litres are in the tank now\?",
             lambda a, per_hour, hours, refill: a - per_hour * hours + refill, 3),
    "shirts": (r"A shop has (\d+) shirts\. It sells (\d+) on Monday and (\d+) on Tuesday, then receives (\d+) boxes "
               r"with (\d+) shirts in each\. How many shirts does the shop have now\?",
               lambda a, mon, tue, boxes, each: a - mon - tue + boxes * each, 4),
    "cookies": (r"A baker bakes (\d+) trays of (\d+) cookies every day for (\d+) days and sells (\d+) cookies\. "
                r"How many cookies are left\?", lambda trays, per_tray, days, sold: trays * per_tray * days - sold, 3),
}


def recompute(text: str) -> tuple[str, int, int]:
    """(template, answer, operations) of a problem, from its text alone.

    Raises:
        AssertionError: no template, or more than one, reads the text.
    """
    found = []
    for template, (pattern, formula, steps) in TEMPLATES.items():
        m = re.fullmatch(pattern, text)
        if m:
            numbers = [int(g) for k, g in enumerate(m.groups(), 1) if k not in m.re.groupindex.values()]
            found.append((template, formula(*numbers), steps))
    assert len(found) == 1, f"{len(found)} templates read {text!r} (a new or changed template?)"
    return found[0]
