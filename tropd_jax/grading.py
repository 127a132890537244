"""Answer extraction and grading: the last `\\boxed{...}` of a completion against a reference answer.

Plain integers (the arithmetic task) are compared exactly, which is also what math-verify concludes for them, only
faster. Anything else goes through math-verify (`4` = `4.0` = `\\frac{8}{2}`); if math-verify cannot parse one side,
the normalised strings are compared exactly.
"""

import decimal
import re
import threading

_INTEGER = re.compile(r'[+-]?\d+')
_SCIENTIFIC = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)E[+-]?\d+')  # math-verify reads a small e as Euler's
_BOXED = '\\boxed{'


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (nested braces kept), or None if there is none.

    An unclosed last box (a completion cut off by the length limit) counts as no answer.
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    begin = start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == '{':
            depth += 1
        elif text[i] == '}':
            if depth == 0:
                return text[begin:i].strip()
            depth -= 1
    return None


def _normalise(answer: str) -> str:
    return answer.strip().strip('$').replace(' ', '')


def _math_verify_equal(prediction: str, answer: str) -> bool | None:
    """math-verify's verdict, or None when either side does not parse."""
    import math_verify

    # math-verify's timeouts use signal.alarm, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = math_verify.parse(f'${answer}$', parsing_timeout=timeout)
    target = math_verify.parse(f'${prediction}$', parsing_timeout=timeout)
    if not gold or not target:
        return None
    return bool(math_verify.verify(gold, target, timeout_seconds=timeout))


def answers_match(prediction: str, answer: str) -> bool:
    """Whether an extracted answer equals the reference answer."""
    prediction, answer = _normalise(prediction), _normalise(answer)
    if _INTEGER.fullmatch(prediction) and _INTEGER.fullmatch(answer):
        return int(prediction) == int(answer)
    if _SCIENTIFIC.fullmatch(prediction) and _INTEGER.fullmatch(answer):
        # math-verify makes `2E21342208` (a sampled digit turned `E`) an exact rational of 21 million digits, which
        # takes minutes and ignores its timeout; Decimal compares it at once.
        return decimal.Decimal(prediction) == int(answer)
    verdict = _math_verify_equal(prediction, answer)
    if verdict is None:
        return prediction == answer
    return verdict


def grade(completion: str, answer: str) -> bool:
    """Whether the completion's last boxed answer equals `answer` (a completion without a box is wrong)."""
    prediction = extract_boxed(completion)
    return prediction is not None and answers_match(prediction, answer)
