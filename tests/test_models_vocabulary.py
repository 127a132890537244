"""tropd_jax.models.vocabulary: padding-only differences pass (and are logged), anything else is an error."""

import logging

import pytest

from tropd_jax.models.vocabulary import check_vocabularies


def test_qwen_padding_is_logged_not_an_error(caplog):
    with caplog.at_level(logging.INFO):
        assert check_vocabularies(151_665, 151_665, 152_064, 151_936) == 151_665
    assert 'differ only by padding: 152,064 vs 151,936 rows around the 151,665 real tokens' in caplog.text


def test_same_rows_log_nothing(caplog):
    with caplog.at_level(logging.INFO):
        assert check_vocabularies(100, 100, 128, 128) == 100
    assert 'padding' not in caplog.text


def test_different_real_vocabularies_are_an_error():
    with pytest.raises(ValueError, match='differ beyond padding: their tokenizers have 151,665 and 32,000 real'):
        check_vocabularies(151_665, 32_000, 152_064, 32_000)


@pytest.mark.parametrize('rows', [(151_000, 151_936), (152_064, 151_000)])
def test_fewer_rows_than_real_tokens_are_an_error(rows):
    with pytest.raises(ValueError, match='151,000 embedding rows, fewer than the 151,665 real tokens'):
        check_vocabularies(151_665, 151_665, *rows)
