import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cdiff.errors import CdiffError
from cdiff.grid import save_grid, tile


def test_a_grid_is_a_png_with_a_label_column(tmp_path):
    save_grid(tmp_path / "g.png", torch.zeros(4, 1, 8, 8), ["a", "b"], per_row=2, title="t")
    with Image.open(tmp_path / "g.png") as im:
        assert im.format == "PNG" and im.width > 2 * 8 * 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_refused_not_drawn_black(tmp_path, bad):
    (tmp_path / "g.png").write_bytes(b"\x89PNG\r\n\x1a\nold")
    images = torch.zeros(4, 1, 8, 8)
    images[2, 0, 3, 3] = bad
    with pytest.raises(CdiffError, match="holds NaN or infinite values"):
        save_grid(tmp_path / "g.png", images, ["a", "b"], per_row=2)
    assert (tmp_path / "g.png").read_bytes().endswith(b"old")  # the old grid is left as it was


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 13),
    channels=st.sampled_from([1, 3]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    per_row=st.integers(1, 8),
    padding=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_tile_draws_the_picture_torchvision_make_grid_draws(n, channels, h, w, per_row, padding, seed):
    from torchvision.utils import make_grid

    images = torch.randint(
        0, 256, (n, channels, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    expected = make_grid(images, nrow=per_row, padding=padding, pad_value=255)
    assert torch.equal(tile(images, per_row, padding), expected)


def test_real_grid_shows_each_class_first_images_in_its_row(tmp_path):
    from cdiff.data import ImageSet
    from cdiff.grid import grid_image, real_grid

    images = torch.tensor([0, 255, 0, 255, 255], dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 4, 4)
    data = ImageSet(images.contiguous(), torch.tensor([0, 1, 0, 1, 2]), ["dark", "light", "few"])
    real_grid(tmp_path / "real.png", data, 2, title="real")
    # by hand: class 0's two black images, class 1's two white ones, class 2's one image then a blank (white) cell
    expected = torch.tensor([-1.0, -1, 1, 1, 1, 1]).view(6, 1, 1, 1).expand(6, 1, 4, 4)
    want = grid_image(expected, ["dark", "light", "few"], 2, title="real")
    got = Image.open(tmp_path / "real.png").convert("RGB")
    assert got.size == want.size and got.tobytes() == want.tobytes()
    wrong = grid_image(expected.flip(0), ["dark", "light", "few"], 2, title="real")
    assert got.tobytes() != wrong.tobytes()
