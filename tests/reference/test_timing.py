"""The reference timed_forward runs real passes and validates its arguments."""

import pytest

from dcpp.reference.model import ModelConfig, init_params
from dcpp.reference.timing import make_timed_forward

CONFIG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=16)


def test_timed_forward_returns_seconds():
    f = make_timed_forward(init_params(CONFIG), CONFIG, num_stages=2, max_model_len=256)
    t = f(32, 100)
    assert 0 < t < 5.0


def test_timed_forward_rejects_out_of_range():
    f = make_timed_forward(init_params(CONFIG), CONFIG, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len=64"):
        f(32, 40)
    with pytest.raises(ValueError, match="num_tokens=0"):
        f(0, 0)
