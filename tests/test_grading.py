"""Boxed-answer extraction and grading, checked against math-verify itself."""

import threading

import math_verify
import pytest

from tropd_jax import grading


@pytest.mark.parametrize(
    'text,expected',
    [
        ('= 7\n\\boxed{7}', '7'),
        ('\\boxed{1} then \\boxed{ 12 }', '12'),  # the last box counts, surrounding spaces dropped
        ('\\boxed{\\frac{1}{2}}.', '\\frac{1}{2}'),  # nested braces
        ('\\boxed{{a}{b{c}}} tail }', '{a}{b{c}}'),
        ('no box here', None),
        ('\\boxed{12', None),  # cut off by the length limit
        ('\\boxed{3} \\boxed{4', None),  # an unclosed last box is no answer, not the earlier one
        ('\\boxed{}', ''),
    ],
)
def test_extract_boxed(text, expected):
    assert grading.extract_boxed(text) == expected


@pytest.mark.parametrize(
    'prediction,answer,expected',
    [
        ('4', '4', True),
        ('4.0', '4', True),
        ('4', '4.0', True),
        ('\\frac{8}{2}', '4', True),
        ('0.5', '\\frac{1}{2}', True),
        ('-3', '-3', True),
        ('007', '7', True),
        ('5', '4', False),
        ('-4', '4', False),
        ('4.5', '4', False),
        ('x+1', '1+x', True),
        ('\\sqrt{4}', '2', True),
    ],
)
def test_answers_match(prediction, answer, expected):
    assert grading.answers_match(prediction, answer) is expected


def test_integer_fast_path_agrees_with_math_verify():
    pairs = [(a, b) for a in ('0', '7', '-7', '42', '0042', '+5', '123456789') for b in ('7', '-7', '42', '5', '0')]
    for prediction, answer in pairs:
        reference = math_verify.verify(math_verify.parse(f'${answer}$'), math_verify.parse(f'${prediction}$'))
        assert grading.answers_match(prediction, answer) == reference, (prediction, answer)


def test_scientific_fast_path_agrees_with_math_verify():
    pairs = [(a, b) for a in ('7E0', '4.2E1', '42E-0', '1E2', '2E3', '.5E1', '2e3') for b in ('7', '42', '100', '5')]
    for prediction, answer in pairs:
        reference = math_verify.verify(math_verify.parse(f'${answer}$'), math_verify.parse(f'${prediction}$'))
        assert grading.answers_match(prediction, answer) == reference, (prediction, answer)
    # A sampled digit turned `E`: math-verify would expand 10**21342208 exactly (minutes); this answers at once.
    assert not grading.answers_match('2E21342208', '2661342208')


def test_grade():
    assert grading.grade('= 3+4\n= 7\n\\boxed{7}', '7')
    assert not grading.grade('= 3+4\n= 7\n\\boxed{8}', '7')
    assert not grading.grade('= 3+4\n= 7', '7')  # the right number without a box is not an answer
    assert grading.grade('\\boxed{3} wait, no: \\boxed{4.0}', '4')
    assert not grading.grade('\\boxed{4.0} wait, no: \\boxed{3}', '4')
    assert not grading.grade('\\boxed{seven}', '7')
    assert grading.grade('\\boxed{abc}', 'abc')  # neither side parses: exact string match


def test_grade_off_the_main_thread():
    # math-verify's timeout relies on signal.alarm; graders in worker threads must still work.
    results = []
    thread = threading.Thread(
        target=lambda: results.append(
            (grading.grade('\\boxed{\\frac{1}{2}}', '0.5'), grading.grade('\\boxed{0.4}', '0.5'))
        )
    )
    thread.start()
    thread.join()
    assert results == [(True, False)]
