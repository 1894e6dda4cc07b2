"""The window convention, pinned with exact masks: which keys each query sees."""

import pytest
import torch

import swattn
from swattn.window import default_positions, visible

from conftest import BACKENDS


def seen(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask]


def test_window_3_over_6_positions_is_the_docstring_picture():
    pos = torch.arange(6)
    assert seen(visible(pos, pos, 3)) == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]


def test_window_1_sees_only_itself():
    pos = torch.arange(5)
    assert seen(visible(pos, pos, 1)) == [[0], [1], [2], [3], [4]]


@pytest.mark.parametrize("window", [None, 5, 6, 100])
def test_window_at_least_the_length_is_causal(window):
    pos = torch.arange(5)
    assert seen(visible(pos, pos, window)) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_empty_slots_and_padding_queries_see_nothing():
    k_pos = torch.tensor([4, -1, 2, 3])  # an unrotated ring: slot 1 not written yet
    q_pos = torch.tensor([4, -1])
    assert seen(visible(q_pos, k_pos, 3)) == [[0, 2, 3], []]


def test_default_positions_put_queries_at_the_end_of_the_keys():
    q_pos, k_pos = default_positions(2, 3, 7)
    assert q_pos.tolist() == [[4, 5, 6]] * 2
    assert k_pos.tolist() == [list(range(7))] * 2


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("window", [1, 3, None])
def test_every_path_attends_exactly_to_the_window(backend, window, small_blocks):
    # q = 0 gives uniform weights over the visible keys; v = identity reads them off
    n = 9
    q = torch.zeros(1, 2, 4, n)
    k = torch.randn(1, 1, n, n)
    v = torch.eye(n).expand(1, 1, n, n).contiguous()
    if backend == "reference":
        out = swattn.reference_attention(q, k, v, window)
    else:
        out = swattn.sliding_window_attention(q, k, v, window, backend=backend)
    expected = visible(torch.arange(n - 4, n), torch.arange(n), window)
    for head in range(2):
        assert seen(out[0, head] > 1e-6) == seen(expected)
        torch.testing.assert_close(out[0, head].sum(-1), torch.ones(4))
