"""Plain PyTorch models and local training, without Flower."""

import pytest
import torch

from fedgov.config import Config
from fedgov.data import build_federation
from fedgov.models import MODELS, build_model, count_parameters
from fedgov.task import evaluate, make_loader, train


@pytest.fixture(scope="module")
def digits():
    return build_federation(Config().data, seed=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_learns_digits_centrally(name, digits):
    # Pool the cooperatives' training data: a model that cannot learn here cannot learn federated.
    import numpy as np

    x = np.concatenate([c.train.x for c in digits.cooperatives])
    y = np.concatenate([c.train.y for c in digits.cooperatives])
    model = build_model(name, input_shape=digits.input_shape, num_classes=digits.num_classes, seed=0)
    before = evaluate(model, digits.global_test.x, digits.global_test.y, device=torch.device("cpu"))
    result = train(model, make_loader(x, y, batch_size=32, shuffle=True, seed=0), epochs=5, lr=0.05,
                   momentum=0.9, device=torch.device("cpu"))
    after = evaluate(model, digits.global_test.x, digits.global_test.y, device=torch.device("cpu"))
    assert result.num_examples == len(y) and result.steps == 5 * -(-len(y) // 32)
    assert before.accuracy < 0.3
    assert after.accuracy > 0.9, after


def test_seeded_initialisation_is_reproducible(digits):
    a = build_model("mlp", input_shape=digits.input_shape, num_classes=10, seed=3)
    b = build_model("mlp", input_shape=digits.input_shape, num_classes=10, seed=3)
    c = build_model("mlp", input_shape=digits.input_shape, num_classes=10, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_input_shape_comes_from_the_data():
    cancer = build_federation(Config().replace(**{"data.dataset": "breast_cancer", "data.partition": "iid"}).data, seed=0)
    model = build_model("logreg", input_shape=cancer.input_shape, num_classes=cancer.num_classes)
    assert count_parameters(model) == (cancer.num_features + 1) * 2


def test_proximal_term_keeps_weights_closer_to_the_start(digits):
    coop = digits.cooperatives[1]
    drifts = []
    for mu in (0.0, 10.0):
        model = build_model("mlp", input_shape=digits.input_shape, num_classes=10, seed=0)
        start = [p.detach().clone() for p in model.parameters()]
        train(model, make_loader(coop.train.x, coop.train.y, batch_size=16, shuffle=True, seed=0), epochs=3,
              lr=0.05, momentum=0.0, device=torch.device("cpu"), proximal_mu=mu)
        drifts.append(sum((p - s).pow(2).sum().item() for p, s in zip(model.parameters(), start)))
    assert drifts[1] < drifts[0]
