"""Overthinking made countable: the redundant segments (re-checks, restatements) a completion has.

Both arithmetic tasks write their redundant segments in a fixed form (the SFT data that makes the
embedded model and the warm start of a real one), so counting them tells whether RL removed the
re-checks or only shortened something else:

    embedded traces     "12+7=19;check 19-7=12;19-5=14;again 19-5=14;ans:14"     -> 2
    worked solutions    "12 + 7 = 19. Let me check: 19 - 7 = 12. The answer is 19."  -> 1
"""

from __future__ import annotations

import re

from agpo_lab.tasks.word_arithmetic import REDUNDANT_OPENERS

_SEGMENT = re.compile(
    r"(?:^|;)(?:check|again) |" + "|".join(re.escape(opener) for opener in REDUNDANT_OPENERS)
)


def count_redundant_segments(text: str) -> int:
    """Redundant segments in a completion of the embedded or the word-arithmetic task.

    Examples: ``count_redundant_segments("3+4=7;check 7-4=3;ans:7") == 1``;
    ``count_redundant_segments("3 + 4 = 7. Again, 3 + 4 = 7. To be sure, 3 + 4 = 7.") == 2``;
    ``count_redundant_segments("3+4=7;ans:7") == 0``.
    """
    return len(_SEGMENT.findall(text)) if isinstance(text, str) else 0
