import torch
from torch import nn

from clf import data
from clf.model import FashionCNN


def test_the_model_learns_a_small_batch_by_heart(real_data):
    # 64 real images, 60 steps of Adam: a network whose gradients reach every layer fits them all; a broken
    # one (a layer cut off from the gradient, an output squashed by a final ReLU or softmax) does not.
    torch.manual_seed(0)
    model = FashionCNN()
    x = data.preprocess(torch.from_numpy(real_data.train.images[:64]))
    y = torch.from_numpy(real_data.train.labels[:64])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert (logits.argmax(1) == y).all()
    assert nn.functional.cross_entropy(logits, y).item() < 0.05
    assert (logits < 0).any()  # raw logits: nothing after the last linear layer clips them


def test_config_rebuilds_the_same_architecture():
    model = FashionCNN(channels=(8, 16), hidden=32)
    clone = FashionCNN(**model.config)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), clone.eval()(x))
