"""Fixtures shared by the evaluation tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine oversubscribed threads are slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """The tiny Llama of the evaluation tests, with the character tokenizer of tests/helpers/tiny_eval.py."""
    from tests.helpers.tiny_eval import tiny_model, tiny_tokenizer

    return tiny_model(tiny_tokenizer())
