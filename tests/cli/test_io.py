"""Tests for tarflow_cli.io: reading inputs, writing outputs, pixel conversions."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow_cli.io import (
    InputError,
    make_grid,
    read_inputs,
    read_labels,
    read_png_metadata,
    to_uint8,
    write_output,
)
from tarflow_core import flow


def _model_images(n=5, c=3, h=8, w=8, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, c, h, w)).astype(np.float32)


def _uint8_images(n=4, c=3, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


# ---------------------------------------------------------------- conversions


def test_to_uint8_rounds_and_clips():
    x = np.array([-5.0, -1.0, 0.0, 1.0, 7.0, 2 / 255 - 1, np.nan], np.float32).reshape(1, 1, 1, 7)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 255, 255, 1, 128]
    assert to_uint8(torch.from_numpy(x)).dtype == np.uint8


def test_uint8_to_model_endpoints_and_round_trip():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    m = flow.uint8_to_model(torch.from_numpy(x)).numpy()
    assert m.dtype == np.float32
    assert m.min() == -1.0 and m.max() == 1.0
    np.testing.assert_array_equal(to_uint8(m), x)


def test_make_grid_layout_and_scale():
    imgs = np.full((5, 1, 4, 4), 200, np.uint8)
    grid = make_grid(imgs, padding=2, scale=2)  # 3 columns, 2 rows of 8x8 images
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 1)
    assert grid[0].max() == 0 and grid[2:10, 2:10].min() == 200
    assert grid[12:20, 22:30].max() == 0  # the 6th cell is empty


# ---------------------------------------------------------------- write -> read round trips


def test_npy_round_trip_keeps_raw_floats(tmp_path):
    x = _model_images()
    x[0, 0, 0, 0], x[1, 2, 3, 4] = 3.5, -2.25
    out = tmp_path / "x.npy"
    assert write_output(torch.from_numpy(x), str(out)) == str(out)
    back = read_inputs([str(out)])
    assert not back.is_uint8 and back.images.dtype == np.float32
    np.testing.assert_array_equal(back.images, x)
    assert back.sources == [f"{out}[{i}]" for i in range(5)]
    assert back.labels is None


def test_npz_is_uint8_nhwc_with_labels_and_meta(tmp_path):
    x = _model_images(n=3)
    out = tmp_path / "s.npz"
    write_output(x, str(out), labels=torch.tensor([4, 0, 9]), metadata={"seed": 1})
    with np.load(out, allow_pickle=False) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (3, 8, 8, 3)
        np.testing.assert_array_equal(z["arr_0"], to_uint8(x).transpose(0, 2, 3, 1))
        assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [4, 0, 9]
        assert json.loads(str(z["tarflow_meta"])) == {"seed": 1}
    back = read_inputs([str(out)])
    assert back.is_uint8
    np.testing.assert_array_equal(back.images, to_uint8(x))
    assert back.labels.tolist() == [4, 0, 9]


def test_folder_round_trip(tmp_path):
    x = _model_images(n=3, c=1)
    folder = tmp_path / "imgs"
    write_output(x, str(folder) + "/", metadata={"k": 2})
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(folder / "000000.png").mode == "L"
    assert read_png_metadata(folder / "000001.png") == {"k": 2}
    back = read_inputs([str(folder)])
    np.testing.assert_array_equal(back.images, to_uint8(x))
    assert back.sources == [str(folder / f) for f in files]
    # an existing folder works without a trailing slash
    write_output(x[:1], str(folder))
    assert len(list(folder.iterdir())) == 3


def test_png_grid_size_and_metadata(tmp_path):
    out = tmp_path / "grid.png"
    write_output(_model_images(n=64, c=1), str(out), metadata={"ckpt": "run/x", "n": 64})
    img = Image.open(out)
    assert img.mode == "L" and img.width >= 256  # tiny 8x8 images are scaled up
    assert read_png_metadata(out) == {"ckpt": "run/x", "n": 64}

    big = tmp_path / "big.png"
    write_output(_model_images(n=64, h=32, w=32), str(big))  # 8 x 8 grid, already wide enough
    assert Image.open(big).size == (8 * 34 + 2, 8 * 34 + 2)
    assert Image.open(big).mode == "RGB" and read_png_metadata(big) is None


def test_stdout_round_trip():
    x = _model_images(n=2)
    x[0, 0, 0, 0] = 1.75
    buf = io.BytesIO()
    assert write_output(x, "-", stdout=buf) is None
    back = read_inputs(["-"], stdin=io.BytesIO(buf.getvalue()))
    np.testing.assert_array_equal(back.images, x)
    assert back.sources == ["-[0]", "-[1]"]


def test_write_output_rejects_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match=r"--out .*x\.jpg.*\.png, \.npz, \.npy"):
        write_output(_model_images(), str(tmp_path / "x.jpg"))


def test_writes_leave_no_temp_files(tmp_path):
    for name in ("a.png", "a.npz", "a.npy", "d/"):
        write_output(_model_images(n=2), f"{tmp_path}/{name}")
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


# ---------------------------------------------------------------- reading images


def test_read_png_files_rgb_and_gray(tmp_path):
    rgb = _uint8_images(n=1)[0].transpose(1, 2, 0)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "b.png")  # RGBA
    got = read_inputs([str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    assert got.is_uint8 and got.images.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(got.images[0], rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(got.images[1], rgb.transpose(2, 0, 1))
    assert got.sources == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]

    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(gray, "L").save(tmp_path / "g.bmp")
    got = read_inputs([str(tmp_path / "g.bmp")])
    assert got.images.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(got.images[0, 0], gray)


def test_read_folder_recursive_sorted(tmp_path):
    for rel in ("b/2.png", "a/1.jpg", "c.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.new("RGB", (6, 6), (10, 20, 30)).save(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    got = read_inputs([str(tmp_path)])
    assert got.sources == [str(tmp_path / r) for r in ("a/1.jpg", "b/2.png", "c.png")]
    assert got.images.shape == (3, 3, 6, 6)


# ---------------------------------------------------------------- reading arrays


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW", "NHWC-RGBA"])
def test_read_npz_layouts(tmp_path, layout):
    nchw = _uint8_images(n=3, c=1 if layout == "NHW" else 3, h=5, w=7)
    arr = {
        "NHWC": nchw.transpose(0, 2, 3, 1),
        "NCHW": nchw,
        "NHW": nchw[:, 0],
        "NHWC-RGBA": np.concatenate([nchw, np.zeros_like(nchw[:, :1])], 1).transpose(0, 2, 3, 1),
    }[layout]
    path = tmp_path / "d.npz"
    np.savez(path, images=arr, labels=np.array([1, 2, 3], np.int32))
    got = read_inputs([str(path)])
    np.testing.assert_array_equal(got.images, nchw)
    assert got.labels.dtype == np.int64 and got.labels.tolist() == [1, 2, 3]


def test_read_downsampled_imagenet_batch(tmp_path):
    nchw = _uint8_images(n=4, c=3, h=8, w=8)
    path = tmp_path / "train_data_batch_1.npz"
    np.savez(path, data=nchw.reshape(4, -1), labels=[1, 1000, 5, 2], mean=np.zeros(192))
    got = read_inputs([str(path)])
    np.testing.assert_array_equal(got.images, nchw)
    assert got.labels.tolist() == [0, 999, 4, 1]


def test_read_float_npy_and_mixed_labels(tmp_path):
    x = _model_images(n=2, c=1)
    np.save(tmp_path / "f.npy", x[:, 0].astype(np.float64))  # NHW float
    got = read_inputs([str(tmp_path / "f.npy")])
    assert got.images.dtype == np.float32 and got.images.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(got.images, x)

    np.savez(tmp_path / "l.npz", arr_0=_uint8_images(n=2), labels=[3, 4])
    np.save(tmp_path / "u.npy", _uint8_images(n=1))
    both = read_inputs([str(tmp_path / "l.npz"), str(tmp_path / "l.npz")])
    assert both.labels.tolist() == [3, 4, 3, 4]
    assert read_inputs([str(tmp_path / "l.npz"), str(tmp_path / "u.npy")]).labels is None


def test_read_labels(tmp_path):
    np.save(tmp_path / "y.npy", np.array([0, 5, 2], np.int16))
    y = read_labels(str(tmp_path / "y.npy"))
    assert y.dtype == np.int64 and y.tolist() == [0, 5, 2]
    np.savez(tmp_path / "y.npz", labels=np.array([7]))
    assert read_labels(str(tmp_path / "y.npz")).tolist() == [7]
    np.save(tmp_path / "bad.npy", np.zeros(3, np.float32))
    for bad in ("bad.npy", "missing.npy"):
        with pytest.raises(InputError, match=bad):
            read_labels(str(tmp_path / bad))


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="nope.png does not exist"):
        read_inputs([str(tmp_path / "nope.png")])


def test_corrupt_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(InputError, match=r"could not read image .*broken\.png"):
        read_inputs([str(tmp_path)])


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match=r"folder .* holds no image files \(looked for \*\.png"):
        read_inputs([str(tmp_path)])


def test_bad_arrays(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"definitely not numpy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "int.npy", np.zeros((2, 3, 4, 4), np.int64))
    np.save(tmp_path / "shape.npy", np.zeros((2, 5, 4, 4), np.float32))
    np.savez(tmp_path / "many.npz", a=np.zeros(2), b=np.zeros(2))
    for name in ("junk.npy", "obj.npy", "int.npy", "shape.npy", "many.npz"):
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            read_inputs([str(tmp_path / name)])


def test_no_images(tmp_path):
    with pytest.raises(InputError, match="no images to read"):
        read_inputs([])
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 8, 8), np.uint8))
    with pytest.raises(InputError, match=r"no images to read: .*empty\.npy"):
        read_inputs([str(tmp_path / "empty.npy")])


def test_empty_stdin():
    with pytest.raises(InputError, match="stdin"):
        read_inputs(["-"], stdin=io.BytesIO(b""))


def test_mixed_shapes_and_kinds(tmp_path):
    np.save(tmp_path / "a.npy", _uint8_images(n=2, h=8, w=8))
    np.save(tmp_path / "b.npy", _uint8_images(n=2, h=16, w=16))
    np.save(tmp_path / "f.npy", _model_images(n=2))
    with pytest.raises(InputError, match=r"b\.npy .*\(3, 16, 16\).*a\.npy.*\(3, 8, 8\)"):
        read_inputs([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")])
    with pytest.raises(InputError, match=r"f\.npy .*float.*uint8"):
        read_inputs([str(tmp_path / "a.npy"), str(tmp_path / "f.npy")])


def test_npz_keys_as_data_reads_them(tmp_path):
    """The keys `--data` accepts (x / y here) are read by score and denoise too."""
    imgs = np.random.default_rng(3).integers(0, 256, (3, 1, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "xy.npz", x=imgs, y=np.array([2, 0, 1]))
    got = read_inputs([str(tmp_path / "xy.npz")])
    assert np.array_equal(got.images, imgs) and got.labels.tolist() == [2, 0, 1]


def test_folder_inputs_skip_hidden_and_scale_16_bit(tmp_path):
    deep = np.full((4, 4), 40000, np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / ".hidden" / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / ".b.png")
    got = read_inputs([str(tmp_path)])
    assert got.sources == [str(tmp_path / "deep.png")]
    assert got.images.shape == (1, 1, 4, 4) and (got.images == round(40000 / 257)).all()


def test_out_is_checked_before_any_work(tmp_path):
    from tarflow_cli.io import check_output

    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad, says in [
        (f"{afile}/", "is a file, not a folder"),
        (f"{afile}/sub/x.png", "nothing can be written under it"),
        (f"{afile}/x.npz", "nothing can be written under it"),
        (str(tmp_path / "x.txt"), "expected a .png"),
        ("-", "stdout is a terminal"),
    ]:
        with pytest.raises(InputError, match=says):
            check_output(bad, stdout_is_tty=True)
    for good in (
        str(tmp_path / "new" / "deeper" / "g.png"),
        f"{tmp_path}/imgs/",
        str(tmp_path / "a.npy"),
        str(tmp_path),
    ):
        check_output(good, stdout_is_tty=True)
    check_output("-", stdout_is_tty=False)
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_outputs_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result must not stay owner-only."""
    import os
    import stat

    from tarflow_core.atomic import default_mode

    x = _model_images(n=2)
    for name in ("g.png", "a.npz", "a.npy", "dir/"):
        write_output(x, f"{tmp_path}/{name}")
    files = [tmp_path / "g.png", tmp_path / "a.npz", tmp_path / "a.npy", *sorted((tmp_path / "dir").iterdir())]
    mask = os.umask(0o022)
    os.umask(mask)
    assert default_mode(directory=False) == 0o666 & ~mask
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_unloadable_arrays_are_described_without_unsafe_advice(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"junk junk")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name, says in (("junk.npy", "neither the NumPy nor the zip header"), ("obj.npy", "unpickling Python objects")):
        for read in (read_labels, lambda p: read_inputs([p])):
            with pytest.raises(InputError, match=says) as err:
                read(str(tmp_path / name))
            assert "allow_pickle" not in str(err.value) and "trust" not in str(err.value)


def test_missing_labels_file_is_one_plain_sentence(tmp_path):
    with pytest.raises(InputError, match="could not read labels .*nope.npy: No such file or directory") as err:
        read_labels(str(tmp_path / "nope.npy"))
    assert "Errno" not in str(err.value) and "FileNotFoundError" not in str(err.value)


def test_an_empty_out_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch):
    """`--out "$OUT"` with OUT unset used to write 000000.png ... into the current folder."""
    from tarflow_cli.io import check_output

    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(InputError, match="is empty"):
            check_output(empty, stdout_is_tty=False)
    assert list(tmp_path.iterdir()) == []


def test_stdin_named_twice_is_refused_by_name(tmp_path):
    """The second - used to find stdin drained and call it empty."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(InputError, match="given 2 times"):
        read_inputs(["-", "-"], stdin=io.BytesIO(buf.getvalue()))


def test_huge_unsigned_labels_are_reported_as_they_are(tmp_path):
    np.save(tmp_path / "y.npy", np.array([1, 2**63 + 5], np.uint64))
    with pytest.raises(InputError, match=str(2**63 + 5)):
        read_labels(str(tmp_path / "y.npy"))


def test_stdin_that_is_closed_or_a_terminal_is_refused(monkeypatch):
    """`score -` from a terminal used to wait forever; with stdin closed (`<&-`) it was a traceback."""

    class Terminal(io.BytesIO):
        def isatty(self):
            return True

        @property
        def buffer(self):
            return self

    for stdin, says in ((None, "stdin \\(-\\) is closed"), (Terminal(), "stdin \\(-\\) is a terminal")):
        monkeypatch.setattr("sys.stdin", stdin)
        with pytest.raises(InputError, match=says):
            read_inputs(["-"])


def test_writing_fewer_images_into_a_used_folder_says_older_ones_remain(tmp_path):
    """Anything reading the folder afterwards (score, an FID tool) takes every PNG in it."""
    x = _model_images(n=3)
    assert "remain" not in write_output(x, f"{tmp_path}/s/")
    said = write_output(x[:1], f"{tmp_path}/s/")
    assert "2 older numbered PNGs from an earlier run remain" in said


class _ShortWrites(io.BytesIO):
    """A raw file (stdout under PYTHONUNBUFFERED=1) that takes at most 100 bytes per call and
    holds `room` bytes in all, after which it fails as a full disk does."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def write(self, data):
        if self.tell() >= self.room:
            raise OSError(28, "No space left on device")
        return super().write(bytes(data[: min(100, self.room - self.tell())]))


def test_stdout_takes_every_byte_or_the_write_fails():
    from tarflow_cli.io import WriteError

    x = _model_images(n=3)
    whole = _ShortWrites(room=10**6)
    write_output(x, "-", stdout=whole)
    assert np.array_equal(np.load(io.BytesIO(whole.getvalue())), x)
    with pytest.raises(WriteError, match="No space left on device"):
        write_output(x, "-", stdout=_ShortWrites(room=150))


def test_a_folders_unreadable_images_are_skipped_and_listed_or_refused_when_strict(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    for name in ("b.png", "c.png"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    got = read_inputs([str(tmp_path)])
    assert got.sources == [str(tmp_path / "a.png")] and got.skipped == [str(tmp_path / n) for n in ("b.png", "c.png")]
    with pytest.raises(InputError, match=r"b\.png.*1 more unreadable file: .*c\.png"):
        read_inputs([str(tmp_path)], strict=True)
    np.save(tmp_path / "two.npy", np.zeros((2, 2, 4, 4), np.float32))
    with pytest.raises(InputError, match="two.npy"):
        read_inputs([str(tmp_path / "two.npy")])
    assert read_inputs([str(tmp_path / "two.npy")], channels=2).images.shape == (2, 2, 4, 4)
