from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_DATA = REPO / "data" / "eval"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from copd_ray.models import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """An untrained tiny policy: enough for engine mechanics, fast to build."""
    import torch

    from copd_ray.models import build_tiny_policy

    torch.set_num_threads(2)
    return build_tiny_policy(tiny_tokenizer, seed=0).eval()
