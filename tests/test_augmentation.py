import torch

from robovlms.augmentation import augment_images


def images(seed=0):
    return torch.randint(0, 256, (2, 3, 2, 16, 16, 3), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_no_shift_and_no_jitter_leave_images_unchanged():
    batch = images()
    assert torch.equal(augment_images(batch, torch.Generator().manual_seed(0), shift=0, colour=0.0), batch)


def test_the_same_generator_seed_gives_the_same_images():
    batch = images()
    first = augment_images(batch, torch.Generator().manual_seed(7))
    assert first.shape == batch.shape and first.dtype == torch.uint8
    assert torch.equal(first, augment_images(batch, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment_images(batch, torch.Generator().manual_seed(8)))


def test_the_frames_of_one_window_share_one_shift():
    still = images()[:, :1].expand(-1, 3, -1, -1, -1, -1)  # every frame of a window identical
    shifted = augment_images(still.contiguous(), torch.Generator().manual_seed(1), colour=0.0)
    assert torch.equal(shifted[:, 0], shifted[:, 1]) and torch.equal(shifted[:, 1], shifted[:, 2])
    assert not torch.equal(shifted, still)
