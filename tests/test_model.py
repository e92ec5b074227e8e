import torch
from torch import nn

from clf.model import FashionCNN


def test_logits_shape_and_raw_output():
    model = FashionCNN().eval()
    x = torch.randn(5, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (5, 10)
    assert logits.dtype == torch.float32
    # Raw logits, not probabilities or ReLU'd scores: some are negative and rows don't sum to 1.
    assert (logits < 0).any()
    assert not torch.allclose(logits.sum(dim=1), torch.ones(5))


def test_has_the_layers_the_task_names():
    kinds = {type(m) for m in FashionCNN().modules()}
    assert {nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear} <= kinds
    assert not isinstance(list(FashionCNN().modules())[-1], nn.ReLU)


def test_config_rebuilds_the_same_architecture():
    model = FashionCNN(channels=(8, 16), hidden=32)
    clone = FashionCNN(**model.config)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), clone.eval()(x))


def test_batch_of_one_in_eval_mode():
    assert FashionCNN().eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
