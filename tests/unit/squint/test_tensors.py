import numpy as np
import pytest
import torch

from squint import tensors
from squint.errors import InvalidRequest


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_keeps_dtype_shape_and_values(dtype):
    array = np.arange(24, dtype=dtype).reshape(2, 3, 4) / 7
    back = tensors.from_proto(tensors.to_proto(array))
    assert back.dtype == dtype and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_torch_tensors_are_accepted():
    message = tensors.to_proto(torch.ones(2, 2))
    assert message.dtype == "float32" and list(message.shape) == [2, 2]


def test_inconsistent_message_names_the_field():
    message = tensors.to_proto(np.zeros((2, 2), np.float32))
    message.shape[:] = [3, 2]
    with pytest.raises(InvalidRequest, match=r"tokens.data holds 16 bytes but shape \[3, 2\] of float32 needs 24"):
        tensors.from_proto(message, "tokens")


def test_unknown_dtype_is_refused():
    message = tensors.to_proto(np.zeros(2, np.float32))
    message.dtype = "int8"
    with pytest.raises(InvalidRequest, match="dtype 'int8'"):
        tensors.from_proto(message)
