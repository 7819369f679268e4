import pytest
import torch

from etappe import models
from etappe.errors import UsageError


@pytest.mark.parametrize("name,shape", [("linear", (1,)), ("sine-mlp", (1,)), ("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)),
                                        ("mlp", (1, 28, 28)), ("cnn", (1, 28, 28))])
def test_builtin_models_are_sized_from_the_data(name, shape):
    model = models.build(name, shape, 10 if name in ("mlp", "cnn") else 1)
    out = model(torch.zeros(3, *shape))
    assert out.shape == (3, 10 if name in ("mlp", "cnn") else 1)


def test_seed_cnn_layout():
    cnn = models.build("cnn", (1, 28, 28), 10)
    assert cnn.conv1.out_channels == 8 and cnn.conv2.out_channels == 16 and cnn.fc1.in_features == 16 * 7 * 7


def test_user_factory_by_module_path():
    model = models.build("torch.nn:Identity", (3,), 3)  # any callable taking the keyword arguments
    assert isinstance(model, torch.nn.Identity)


def test_unknown_model_names_choices():
    with pytest.raises(UsageError, match="choose one of: linear, sine-mlp, mlp, cnn"):
        models.build("resnet", (1, 8, 8), 10)
    with pytest.raises(UsageError, match="cannot import module 'no_such_module'"):
        models.build("no_such_module:make", (1,), 1)


def test_cnn_refuses_flat_input_with_a_clear_message():
    with pytest.raises(UsageError, match=r"needs image data shaped \(channels, height, width\), got input shape \(1,\)"):
        models.build("cnn", (1,), 1)
