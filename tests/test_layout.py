"""Row layouts: the kernels see [..., V] tensors as [B, T, V] strided views without copying."""
import torch

from rlsd_kernels._layout import as_rows3d


def test_contiguous_and_shifted_views_are_not_copied():
    x = torch.randn(3, 7, 11)
    for view in (x, x[:, :-1], x[:, 1:], x[0], x.reshape(21, 11), x[:2, 2:5]):
        v = as_rows3d(view)
        assert v.data_ptr() == view.data_ptr() or view.numel() == 0
        torch.testing.assert_close(v.reshape(-1, 11), view.reshape(-1, 11))


def test_unmergeable_layout_falls_back_to_copy():
    x = torch.randn(4, 5, 6, 7)[:, 1:, ::2]  # three leading dims that cannot merge into two
    v = as_rows3d(x)
    torch.testing.assert_close(v.reshape(-1, 7), x.reshape(-1, 7))


def test_noncontiguous_vocab_and_scalar_rows():
    x = torch.randn(7, 5).t()  # [5, 7] with stride(-1) = 5
    v = as_rows3d(x)
    assert v.stride(-1) == 5 and v.shape == (1, 5, 7)
    y = torch.randn(13)
    assert as_rows3d(y).shape == (1, 1, 13)
