import os

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shapes_pipe():
    from studio import load_pipeline

    return load_pipeline("shapes")


@pytest.fixture(scope="session")
def judge():
    from studio.judge import load_judge

    return load_judge()
