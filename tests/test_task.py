"""Plain PyTorch models and local training, without Flower."""

import numpy as np
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


# ---- the closed-form path for logistic regression -----------------------------------

@pytest.mark.parametrize("momentum,mu,batch,epochs", [(0.0, 0.0, 10, 3), (0.9, 0.0, 16, 2), (0.0, 1.0, 7, 4),
                                                      (0.5, 0.01, 64, 1)])
def test_softmax_regression_fast_path_takes_autograds_steps(momentum: float, mu: float, batch: int, epochs: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(93, 12)).astype(np.float32)  # 93: the last batch is short for every size above
    y = rng.integers(0, 4, size=93)
    fast = build_model("logreg", input_shape=(12,), num_classes=4)
    slow = build_model("logreg", input_shape=(12,), num_classes=4)
    slow.load_state_dict(fast.state_dict())
    cpu = torch.device("cpu")
    fast_result = train(fast, make_loader(x, y, batch_size=batch, shuffle=True, seed=5), epochs=epochs, lr=0.1,
                        momentum=momentum, device=cpu, proximal_mu=mu)
    # An explicit criterion sends the same call down the autograd path.
    slow_result = train(slow, make_loader(x, y, batch_size=batch, shuffle=True, seed=5), epochs=epochs, lr=0.1,
                        momentum=momentum, device=cpu, proximal_mu=mu, criterion=torch.nn.CrossEntropyLoss())
    assert fast_result.steps == slow_result.steps == epochs * -(-93 // batch)
    assert fast_result.train_loss == pytest.approx(slow_result.train_loss, rel=1e-5)
    for name, tensor in slow.state_dict().items():
        np.testing.assert_allclose(fast.state_dict()[name].numpy(), tensor.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    assert not torch.equal(fast.linear.weight, build_model("logreg", input_shape=(12,), num_classes=4).linear.weight)


def test_batch_orders_match_the_dataloaders_batches() -> None:
    from fedgov.task import _batch_orders

    x = np.arange(23, dtype=np.float32).reshape(23, 1)
    y = np.zeros(23, dtype=np.int64)
    loader = make_loader(x, y, batch_size=5, shuffle=True, seed=11)
    served = [xb[:, 0].long().tolist() for _ in range(3) for xb, _ in loader]
    twin = make_loader(x, y, batch_size=5, shuffle=True, seed=11)
    orders = [o.tolist() for o in _batch_orders(twin, 3)]
    assert [row for order in orders for row in order] == [row for b in served for row in b]
    assert orders[0] != orders[1]  # a new permutation each epoch
