"""Datasets, file checks, transforms and the loader of minifcn/data."""
import numpy as np
import pytest
from PIL import Image

from minifcn.data import (IMAGENET_MEAN_RGB, SHAPES_CLASSES, DataLoader, DatasetError, FolderDataset,
                          ShapesDataset, VOCSegmentation, get_dataset, read_image, read_mask, to_tensor,
                          validate_dataset)
from minifcn.data.transforms import random_crop, random_flip
from minifcn.viz import voc_palette


# --------------------------------------------------------------------------- helpers

def write_palette_png(path, label):
    im = Image.fromarray(np.asarray(label, np.uint8), mode="P")
    im.putpalette(voc_palette().ravel().tolist())
    im.save(path)


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_voc(root, ids=("a", "b"), size=(16, 20)):
    """A tiny VOC2012 tree: JPEGs, palette masks holding 0, 1, 15 and 255, a train list."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    h, w = size
    for k, i in enumerate(ids):
        Image.fromarray(random_image(h, w, k)).save(root / "JPEGImages" / f"{i}.jpg")
        label = np.zeros((h, w), np.uint8)
        label[2:8, 3:9], label[9:14, 10:18], label[8, :] = 1, 15, 255
        write_palette_png(root / "SegmentationClass" / f"{i}.png", label)
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def make_folder(root, stems=("x", "y"), size=(12, 10), value=2):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    h, w = size
    for k, s in enumerate(stems):
        Image.fromarray(random_image(h, w, k)).save(root / "images" / f"{s}.png")
        label = np.zeros((h, w), np.uint8)
        label[:4] = value
        label[-1] = 255
        Image.fromarray(label, mode="L").save(root / "masks" / f"{s}.png")
    return root


def error_text(excinfo):
    return str(excinfo.value)


# --------------------------------------------------------------------------- shapes

def test_shapes_same_seed_gives_identical_arrays():
    a, b = ShapesDataset(seed=3, num_images=5), ShapesDataset(seed=3, num_images=5)
    for i in range(5):
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][1], b[i][1])
    assert not np.array_equal(a[0][0], ShapesDataset(seed=4)[0][0])


def test_shapes_image_independent_of_num_images():
    small, large = ShapesDataset(num_images=10), ShapesDataset(num_images=100)
    for i in (0, 7, 9):
        np.testing.assert_array_equal(small[i][0], large[i][0])
        np.testing.assert_array_equal(small[i][1], large[i][1])


def test_shapes_train_and_val_differ():
    train, val = ShapesDataset("train"), ShapesDataset("val")
    assert (len(train), len(val)) == (512, 128)
    for i in range(5):
        assert not np.array_equal(train[i][0], val[i][0])


def test_shapes_dtypes_shapes_and_classes():
    ds = ShapesDataset(num_images=40, image_size=(48, 80))
    assert ds.num_classes == 6 and ds.class_names == list(SHAPES_CLASSES)
    seen = np.zeros(6, bool)
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (48, 80, 3)
        assert label.dtype == np.uint8 and label.shape == (48, 80)
        assert label.max() < ds.num_classes
        seen[np.unique(label)] = True
    assert seen.all(), f"classes never drawn: {np.flatnonzero(~seen)}"


def test_shapes_cache_returns_the_same_read_only_samples():
    cached, fresh = ShapesDataset(num_images=4, image_size=32), ShapesDataset(num_images=4, image_size=32, cache_bytes=0)
    first = cached[2]
    assert cached[2][0] is first[0] and cached[-2][1] is first[1]  # rendered once
    np.testing.assert_array_equal(first[0], fresh[2][0])
    np.testing.assert_array_equal(first[1], fresh[2][1])
    with pytest.raises(ValueError, match="read-only"):
        first[0][0, 0, 0] = 1  # a consumer that wrote into a cached sample would corrupt every later epoch
    assert fresh[2][0] is not fresh[2][0] and fresh[2][0].flags.writeable


def test_shapes_cache_stays_within_its_budget():
    per_sample = 32 * 32 * 4  # image (32, 32, 3) and label (32, 32), uint8
    ds = ShapesDataset(num_images=10, image_size=32, cache_bytes=3 * per_sample + 5)
    for i in range(10):
        ds[i]
    assert ds[2][0] is ds[2][0] and ds[3][0] is not ds[3][0]  # the first three fit, the rest are rendered again
    assert ds._cached_bytes == 3 * per_sample


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test")
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=8)
    with pytest.raises(ValueError, match="cache_bytes"):
        ShapesDataset(cache_bytes=-1)
    with pytest.raises(IndexError):
        ShapesDataset(num_images=3)[3]


def test_validate_shapes_and_label_range():
    data = ShapesDataset(num_images=20)
    counts = validate_dataset(data, 6)  # returns the pixel count of every class
    want = sum(np.bincount(data[i][1].ravel(), minlength=6) for i in range(20))
    np.testing.assert_array_equal(counts, want)
    assert counts.sum() == 20 * data.image_size[0] * data.image_size[1] and (counts > 0).all()
    with pytest.raises(DatasetError, match=r"ShapesDataset\[\d+\].*label value [345] >= num_classes=3"):
        validate_dataset(ShapesDataset(num_images=20), 3)
    with pytest.raises(DatasetError, match="empty"):
        validate_dataset(ShapesDataset(num_images=0), 6)


# --------------------------------------------------------------------------- VOC

def test_voc_palette_masks_decode_to_indices(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    ds = VOCSegmentation(root, "train")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.class_names[15] == "person"
    assert ds.files[0] == (str(root / "JPEGImages/a.jpg"), str(root / "SegmentationClass/a.png"))
    image, label = ds[0]
    assert image.shape == (16, 20, 3) and image.dtype == np.uint8
    assert label.shape == (16, 20) and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1, 15, 255}
    assert label[8, 0] == 255 and label[3, 4] == 1 and label[10, 11] == 15
    validate_dataset(ds, 21)
    # the VOCdevkit folder above it works too
    assert len(VOCSegmentation(tmp_path, "train")) == 2


def test_voc_missing_folder_and_split_file(tmp_path):
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(tmp_path / "nope")
    assert str(tmp_path / "nope") in error_text(e)
    with pytest.raises(DatasetError, match="JPEGImages"):
        VOCSegmentation(tmp_path)
    root = make_voc(tmp_path / "VOC2012")
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(root, "val")
    assert str(root / "ImageSets/Segmentation/val.txt") in error_text(e) and "'val'" in error_text(e)
    assert "train" in error_text(e)  # lists the splits that exist


def test_voc_empty_split(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    (root / "ImageSets/Segmentation/empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty") as e:
        VOCSegmentation(root, "empty")
    assert "empty.txt" in error_text(e)


def test_voc_image_without_mask(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    (root / "SegmentationClass/b.png").unlink()
    ds = VOCSegmentation(root)
    with pytest.raises(DatasetError, match="image without mask") as e:
        validate_dataset(ds, 21)
    assert str(root / "JPEGImages/b.jpg") in error_text(e)
    assert "a.jpg" not in error_text(e)


def test_voc_corrupt_and_truncated_jpeg(tmp_path):
    root = make_voc(tmp_path / "VOC2012", size=(64, 64))
    (root / "JPEGImages/a.jpg").write_bytes(b"this is not a jpeg")
    data = (root / "JPEGImages/b.jpg").read_bytes()
    (root / "JPEGImages/b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as e:
        validate_dataset(VOCSegmentation(root), 21)
    text = error_text(e)
    assert "2 problem(s)" in text
    assert f"cannot read image {root / 'JPEGImages/a.jpg'}" in text and "cannot identify image file" in text
    assert f"cannot read image {root / 'JPEGImages/b.jpg'}" in text and "truncated" in text


# --------------------------------------------------------------------------- folder

def test_folder_dataset_and_inferred_classes(tmp_path):
    ds = FolderDataset(make_folder(tmp_path / "d", value=4))
    assert len(ds) == 2 and ds.num_classes == 5  # max label 4 (+1), 255 not counted
    assert ds.class_names == [f"class_{k}" for k in range(5)]
    image, label = ds[1]
    assert image.shape == (12, 10, 3) and label.shape == (12, 10)
    assert set(np.unique(label).tolist()) == {0, 4, 255}
    assert FolderDataset(tmp_path / "d", num_classes=7).num_classes == 7
    named = FolderDataset(tmp_path / "d", class_names=["bg", "a", "b", "c", "d", "e"])
    assert named.num_classes == 6 and named.class_names[1] == "a"
    validate_dataset(ds, ds.num_classes)


def test_folder_missing_and_empty(tmp_path):
    with pytest.raises(DatasetError) as e:
        FolderDataset(tmp_path / "missing")
    assert str(tmp_path / "missing") in error_text(e)
    (tmp_path / "d/images").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        FolderDataset(tmp_path / "d")
    assert str(tmp_path / "d/masks") in error_text(e)
    (tmp_path / "d/masks").mkdir()
    with pytest.raises(DatasetError, match="no images found") as e:
        FolderDataset(tmp_path / "d")
    assert str(tmp_path / "d/images") in error_text(e)


def test_folder_image_without_mask_and_mask_without_image(tmp_path):
    root = make_folder(tmp_path / "d", stems=("x", "y"))
    (root / "masks/y.png").rename(root / "masks/z.png")
    with pytest.raises(DatasetError) as e:
        validate_dataset(FolderDataset(root), 3)
    text = error_text(e)
    assert f"image without mask: {root / 'images/y.png'}" in text
    assert f"mask without image: {root / 'masks/z.png'}" in text


def test_folder_size_mismatch_names_file_and_both_sizes(tmp_path):
    root = make_folder(tmp_path / "d", size=(12, 10))
    Image.fromarray(np.zeros((9, 10), np.uint8), mode="L").save(root / "masks/y.png")
    with pytest.raises(DatasetError) as e:
        validate_dataset(FolderDataset(root), 3)
    text = error_text(e)
    assert str(root / "masks/y.png") in text and "10x9" in text and "10x12" in text
    assert "x.png" not in text.replace("masks/y.png", "")


def test_folder_label_out_of_range_names_value_and_file(tmp_path):
    root = make_folder(tmp_path / "d", value=7)
    with pytest.raises(DatasetError) as e:
        validate_dataset(FolderDataset(root, num_classes=5), 5)
    text = error_text(e)
    assert "label value 7 >= num_classes=5" in text
    assert str(root / "masks/x.png") in text and str(root / "masks/y.png") in text


def test_corrupt_png_and_colour_mask(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "images/x.png").write_bytes(b"\x89PNG garbage")
    Image.fromarray(random_image(12, 10)).save(root / "masks/y.png")  # RGB colour mask
    with pytest.raises(DatasetError) as e:
        validate_dataset(FolderDataset(root), 3)
    text = error_text(e)
    assert f"cannot read image {root / 'images/x.png'}" in text
    assert f"mask {root / 'masks/y.png'} has mode 'RGB'" in text


def test_read_helpers(tmp_path):
    with pytest.raises(DatasetError, match="image file not found: .*nothing.png"):
        read_image(tmp_path / "nothing.png")
    with pytest.raises(DatasetError, match="mask file not found"):
        read_mask(tmp_path / "nothing.png")
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png"), grey)
    assert read_image(tmp_path / "g.png").shape == (3, 4, 3)


def test_get_dataset(tmp_path):
    assert isinstance(get_dataset("shapes", split="val", num_images=3), ShapesDataset)
    assert isinstance(get_dataset("voc", make_voc(tmp_path / "voc")), VOCSegmentation)
    make_folder(tmp_path / "f/val")
    assert len(get_dataset("folder", tmp_path / "f", split="val")) == 2
    make_folder(tmp_path / "g", stems=("p", "q", "r"))  # a lone folder is the train split only
    assert len(get_dataset("folder", tmp_path / "g", split="train", num_classes=3)) == 3
    with pytest.raises(DatasetError, match="'val' split"):
        get_dataset("folder", tmp_path / "g", split="val")
    with pytest.raises(DatasetError, match="train"):
        get_dataset("folder", tmp_path / "f", split="train")
    with pytest.raises(ValueError, match="shapes, voc, folder"):
        get_dataset("cityscapes")
    with pytest.raises(ValueError, match="data_dir"):
        get_dataset("voc")


# --------------------------------------------------------------------------- transforms and loader

def test_to_tensor_mean_bgr_scale():
    image = np.array([[[200, 100, 50]]], np.uint8)
    x = to_tensor(image)
    assert x.dtype == np.float32 and x.shape == (3, 1, 1)
    np.testing.assert_allclose(x[:, 0, 0], np.array([200, 100, 50]) - np.array(IMAGENET_MEAN_RGB), rtol=1e-6)
    xb = to_tensor(image, bgr=True, scale=0.5)
    np.testing.assert_allclose(xb[:, 0, 0], 0.5 * (np.array([50, 100, 200]) - np.array(IMAGENET_MEAN_RGB[::-1])),
                               rtol=1e-6)
    assert to_tensor(np.zeros((2, 4, 5, 3), np.uint8), mean=None).shape == (2, 3, 4, 5)


def test_random_crop_pads_small_images():
    image, label = np.full((3, 4, 3), 9, np.uint8), np.ones((3, 4), np.uint8)
    ci, cl = random_crop(image, label, (5, 6), np.random.default_rng(0), fill=(10, 20, 30))
    assert ci.shape == (5, 6, 3) and cl.shape == (5, 6)
    assert (cl == 1).sum() == 12 and (cl == 255).sum() == 30 - 12
    np.testing.assert_array_equal(ci[cl == 255], np.tile([10, 20, 30], (18, 1)))
    assert (ci[cl == 1] == 9).all()


def test_random_flip_flips_image_and_label_together():
    image, label = np.arange(6, dtype=np.uint8).reshape(1, 2, 3), np.array([[1, 2]], np.uint8)
    fi, fl = random_flip(image, label, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(fi, image[:, ::-1])
    np.testing.assert_array_equal(fl, [[2, 1]])
    assert random_flip(image, label, np.random.default_rng(0), p=0.0)[1] is label


class CodedDataset:
    """Image channel 0 equals the label; channel 1 the row, channel 2 the column."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        h, w = self.sizes[i]
        y, x = np.mgrid[0:h, 0:w]
        label = ((7 * y + 13 * x + i) % 200).astype(np.uint8)
        return np.stack([label, y, x], -1).astype(np.uint8), label


def test_loader_batches_shapes_and_dtypes():
    loader = DataLoader(ShapesDataset(num_images=10), batch_size=4)
    assert len(loader) == 3
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 64, 64)] * 2 + [(2, 3, 64, 64)]
    images, labels = batches[0]
    assert images.dtype == np.float32 and labels.dtype == np.int64 and labels.shape == (4, 64, 64)
    assert len(DataLoader(ShapesDataset(num_images=10), batch_size=4, drop_last=True)) == 2


def test_loader_epoch_determinism_and_resume():
    ds = ShapesDataset(num_images=12)
    kw = dict(batch_size=3, shuffle=True, seed=5, crop_size=40, flip=True)
    first = DataLoader(ds, **kw)
    for e in range(3):  # an uninterrupted run consumes epochs 0, 1, 2
        list(first.epoch(e))
    run = list(first.epoch(3))
    resumed = list(DataLoader(ds, **kw).epoch(3))
    for (a, la), (b, lb) in zip(run, resumed):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    other = list(first.epoch(4))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(run, other))
    assert not np.array_equal(first.order(3), DataLoader(ds, **{**kw, "seed": 6}).order(3))
    assert sorted(first.order(3)) == list(range(12))


def test_loader_augmentation_changes_between_epochs():
    loader = DataLoader(CodedDataset([(20, 30)] * 4), batch_size=4, crop_size=8, flip=True, mean=None)
    (a, _), (b, _) = next(loader.epoch(0)), next(loader.epoch(1))
    np.testing.assert_array_equal(a, next(iter(loader))[0])  # iter(loader) is epoch 0
    assert not np.array_equal(a, b)


def test_loader_crop_and_flip_keep_image_and_label_aligned():
    ds = CodedDataset([(20, 30)] * 6)
    loader = DataLoader(ds, batch_size=2, shuffle=True, crop_size=(8, 12), flip=True, mean=None)
    offsets, flipped = set(), False
    for e in range(4):
        for images, labels in loader.epoch(e):
            assert images.shape == (2, 3, 8, 12) and labels.shape == (2, 8, 12)
            np.testing.assert_array_equal(images[:, 0], labels)
            rows, cols = images[:, 1], images[:, 2]
            assert (np.diff(rows, axis=1) == 1).all()  # still contiguous rows
            flipped |= bool((np.diff(cols, axis=2) == -1).all(axis=(1, 2)).any())
            offsets.update(zip(rows[:, 0, 0].tolist(), cols[:, 0, 0].tolist()))
    assert flipped and len(offsets) > 3


def test_loader_crop_pads_with_ignore():
    loader = DataLoader(CodedDataset([(5, 6)]), crop_size=8, mean=None)
    images, labels = next(iter(loader))
    assert labels.shape == (1, 8, 8) and (labels == 255).sum() == 64 - 30
    assert (images[0][:, labels[0] == 255] == 0).all()


def test_loader_mixed_sizes_need_batch_size_one_or_crop():
    ds = CodedDataset([(10, 12), (10, 12), (14, 9)])
    with pytest.raises(ValueError, match="batch_size=1 or set crop_size") as e:
        list(DataLoader(ds, batch_size=3))
    assert "12x10" in str(e.value) and "9x14" in str(e.value)
    assert [b[0].shape[2:] for b in DataLoader(ds, batch_size=1)] == [(10, 12), (10, 12), (14, 9)]
    assert next(iter(DataLoader(ds, batch_size=3, crop_size=8)))[0].shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(ds, batch_size=0)


def test_folder_refuses_to_infer_a_class_count_from_a_stray_value(tmp_path):
    """0, 1, 2 and one pixel of 200: not 201 classes; the error names the value, its file and pixels."""
    root = make_folder(tmp_path / "d", stems=("a", "b"), value=2)
    mask = np.zeros((12, 10), np.uint8)
    mask[:3] = 1
    mask[5, 5] = 200
    Image.fromarray(mask, mode="L").save(root / "masks" / "b.png")
    with pytest.raises(DatasetError) as e:
        FolderDataset(root).num_classes
    message = error_text(e)
    assert "[0, 1, 2, 200]" in message and "201-class model in which 197 classes never occur" in message
    assert f"value 200 (1 pixel(s), first in {root / 'masks' / 'b.png'}: 1 there)" in message
    assert "--num-classes" in message
    assert FolderDataset(root, num_classes=201).num_classes == 201  # said explicitly, it is accepted
    assert FolderDataset(make_folder(tmp_path / "e", value=8)).num_classes == 9  # a gap of 7 is not stray


@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_indices_name_the_samples_of_each_batch_of_a_shard(shuffle):
    """batch_indices(e) lists, batch by batch, the samples epoch(e) yields on this shard (crops and flips
    included): together the shards cover the epoch's order once."""
    ds = ShapesDataset("train", 11, image_size=24, seed=3)
    one_by_one = [labels[0] for _, labels in DataLoader(ds, 1, seed=5, crop_size=16, flip=True).epoch(1)]
    seen = []
    for shard in (0, 1):
        loader = DataLoader(ds, 2, shuffle=shuffle, seed=5, crop_size=16, flip=True, num_shards=2, shard=shard)
        parts = list(loader.batch_indices(1))
        for part, (_, labels) in zip(parts, loader.epoch(1), strict=True):
            assert np.array_equal(labels, np.stack([one_by_one[i] for i in part]))
        seen += [int(i) for part in parts for i in part]
    assert sorted(seen) == list(range(11))
