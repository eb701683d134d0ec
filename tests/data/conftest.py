import pytest

from ppllava_jax.data import synthetic


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """(directory, dataset_info) of a small synthetic set: 24 train + 8 eval clips, 8 frames of
    32 x 32, with its LLaMA and CLIP tokenizers."""
    out = str(tmp_path_factory.mktemp("syn"))
    info = synthetic.generate(out, num_train=24, num_eval=8, frames=8, size=32)
    return out, info
