"""Medical image I/O: windowing values, MONOCHROME1, frames, compressed DICOM, NIfTI orientation, errors."""

from __future__ import annotations

import gzip
import io
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from cambrian_core.data.case import ImageRef
from cambrian_core.data.medimage import ImageLoadError, dicom_header, load_image, mime_type, to_png_bytes
from cambrian_core.data.windowing import PRESETS, resolve_window


def _ct(hu: np.ndarray, path, photometric: str = "MONOCHROME2", **tags) -> str:
    """Write a CT DICOM whose stored values are ``hu + 1024`` (slope 1, intercept -1024)."""
    stored = (np.asarray(hu) + 1024).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 1
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(path)


HU = np.array([[-1350, -975, -600, 0, 20, 40, 60, 80, 150, 1000]])


def _grey(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0].astype(int)


def test_explicit_window_and_presets_give_known_grey_levels(tmp_path):
    path = _ct(HU, tmp_path / "ct.dcm")
    # lung (-600, 1500): -1350 -> 0, -975 -> 63.75, -600 -> 127.5, 0 -> 229.5, 150 -> 255
    assert _grey(load_image(path, window="lung"))[0].tolist() == [
        0,
        64,
        128,
        230,
        233,
        236,
        240,
        243,
        255,
        255,
    ]
    # brain (40, 80): 0 -> 0, 20 -> 63.75, 40 -> 127.5, 60 -> 191.25, 80 -> 255
    assert _grey(load_image(path, window="brain"))[0].tolist() == [0, 0, 0, 0, 64, 128, 191, 255, 255, 255]
    assert (
        _grey(load_image(path, window=(40, 80))).tolist() == _grey(load_image(path, window="brain")).tolist()
    )
    assert (
        _grey(load_image(path, window="40,80")).tolist() == _grey(load_image(path, window="brain")).tolist()
    )
    assert set(PRESETS) == {"lung", "mediastinum", "bone", "brain", "abdomen", "liver"}


def test_window_from_dicom_tags_uses_dicom_linear_function(tmp_path):
    path = _ct(HU, tmp_path / "ct.dcm", WindowCenter=40, WindowWidth=80)
    got = _grey(load_image(path))[0]
    # DICOM PS3.3 C.11.2.1.2.1: ((x - (c - 0.5)) / (w - 1) + 0.5) clipped, scaled to 0..255
    expected = np.clip(((HU[0] - 39.5) / 79 + 0.5) * 255, 0, 255).round().astype(int)
    assert got.tolist() == expected.tolist()
    assert got[5] == 129  # differs from the plain linear window's 128
    # an explicit preset overrides the tags
    assert _grey(load_image(path, window="lung"))[0, 2] == 128


def test_monochrome1_is_inverted(tmp_path):
    m2 = _grey(load_image(_ct(HU, tmp_path / "m2.dcm"), window="brain"))
    m1 = _grey(load_image(_ct(HU, tmp_path / "m1.dcm", photometric="MONOCHROME1"), window="brain"))
    assert (m1 == 255 - m2).all()
    # invert=True on MONOCHROME1 gives back the MONOCHROME2 look
    assert (_grey(load_image(tmp_path / "m1.dcm", window="brain", invert=True)) == m2).all()


def test_multiframe_frame_choice(tmp_path):
    frames = np.stack([np.full((4, 4), hu) for hu in (0, 40, 80)])  # three frames, one value each
    path = _ct(frames, tmp_path / "mf.dcm")
    assert _grey(load_image(path, window="brain", frame=0)).max() == 0
    assert _grey(load_image(path, window="brain", frame=2)).min() == 255
    assert (_grey(load_image(path, window="brain")) == 128).all()  # default: middle frame
    with pytest.raises(ImageLoadError, match=r"mf\.dcm: frame 3 out of range: the image has 3"):
        load_image(path, frame=3)


def test_enhanced_multiframe_rescale_from_functional_groups(tmp_path):
    hu = np.stack([np.full((2, 2), 0), np.full((2, 2), 80)])
    path = tmp_path / "enh.dcm"
    _ct(hu, path)
    ds = pydicom.dcmread(path)
    del ds.RescaleSlope, ds.RescaleIntercept  # move rescale into the shared functional group
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, -1024, "HU"
    shared = Dataset()
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.save_as(path)
    assert (_grey(load_image(path, window="brain", frame=0)) == 0).all()
    assert (_grey(load_image(path, window="brain", frame=1)) == 255).all()


@pytest.mark.parametrize(
    ("compressed", "plain"),
    [("693_J2KR.dcm", "693_UNCR.dcm"), ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm")],
)
def test_compressed_transfer_syntax_decodes_like_uncompressed(compressed, plain):
    a = load_image(get_testdata_file(compressed), window="minmax")
    b = load_image(get_testdata_file(plain), window="minmax")
    assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).std() > 10  # a real picture, not a flat field


def test_real_chest_cr_and_header():
    path = get_testdata_file("RG1_UNCR.dcm")
    img = load_image(path, max_size=256)
    assert img.mode == "RGB" and max(img.size) == 256
    assert dicom_header(path)["Modality"] == "CR" and dicom_header(path)["BodyPartExamined"] == "CHEST"
    assert load_image(get_testdata_file("US1_UNCR.dcm")).mode == "RGB"  # colour ultrasound


def test_dicom_series_folder_orders_by_position(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for z, hu in ((20.0, 80), (0.0, 0), (10.0, 40)):  # written out of order
        _ct(
            np.full((2, 2), hu),
            folder / f"s{int(z)}.dcm",
            ImagePositionPatient=[0, 0, z],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        )
    assert (_grey(load_image(folder, window="brain")) == 128).all()
    assert (_grey(load_image(folder, window="brain", slice_index=0)) == 0).all()
    assert (_grey(load_image(folder, window="brain", slice_index=-1)) == 255).all()


# ------------------------------------------------------------------------------------------------ NIfTI


def _volume_with_bright_voxel(shape=(10, 12, 8), at=(2, 9, 5)) -> np.ndarray:
    vol = np.zeros(shape, dtype=np.int16)
    vol[at] = 1000
    return vol


def _save_ras_and_lps(tmp_path):
    """The same physical volume stored RAS (identity affine) and flipped in x and y (LPS)."""
    vol = _volume_with_bright_voxel()
    ras = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), ras)
    lps_affine = np.array([[-1, 0, 0, 9], [0, -1, 0, 11], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    lps = tmp_path / "lps.nii"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol[::-1, ::-1, :]), lps_affine), lps)
    return ras, lps


@pytest.mark.parametrize(
    ("axis", "index", "shape", "pixel"),
    [("axial", 5, (12, 10), (2, 7)), ("coronal", 9, (8, 10), (2, 7)), ("sagittal", 2, (8, 12), (2, 2))],
)
def test_nifti_canonical_orientation(tmp_path, axis, index, shape, pixel):
    ras, lps = _save_ras_and_lps(tmp_path)
    for path in (ras, lps):
        g = _grey(load_image(path, slice_axis=axis, slice_index=index, window="minmax"))
        assert g.shape == shape, path
        assert tuple(np.argwhere(g == 255)[0]) == pixel, path  # patient right on image left, top = A / S
        assert (g > 0).sum() == 1


def test_nifti_voxel_mask_and_phase(tmp_path):
    ras, lps = _save_ras_and_lps(tmp_path)
    # voxel in the *file's* index space: (7, 2, 5) in the LPS file is (2, 9, 5) in RAS
    assert _grey(load_image(lps, voxel=(7, 2, 5), window="minmax")).max() == 255
    assert _grey(load_image(lps, voxel=(7, 2, 4), window="minmax")).max() == 0
    mask = np.zeros((10, 12, 8), np.uint8)
    mask[1:4, 8:11, 4:7] = 1  # centroid (2, 9, 5)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii.gz")
    assert _grey(load_image(lps, mask=tmp_path / "mask.nii.gz", window="minmax")).max() == 255
    nib.save(nib.Nifti1Image(np.zeros_like(mask), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(ImageLoadError, match=r"empty\.nii\.gz: mask is empty"):
        load_image(ras, mask=tmp_path / "empty.nii.gz")
    four = np.stack([_volume_with_bright_voxel(), _volume_with_bright_voxel(at=(2, 9, 1))], axis=-1)
    nib.save(nib.Nifti1Image(four, np.eye(4)), tmp_path / "4d.nii.gz")
    assert _grey(load_image(tmp_path / "4d.nii.gz", phase=0, slice_index=5, window="minmax")).max() == 255
    assert _grey(load_image(tmp_path / "4d.nii.gz", phase=1, slice_index=5, window="minmax")).max() == 0
    assert _grey(load_image(tmp_path / "4d.nii.gz", phase=1, slice_index=1, window="minmax")).max() == 255


def test_real_nifti_from_nibabel():
    data = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
    img = load_image(ImageRef(os.path.join(data, "example4d.nii.gz"), options={"phase": 1}))
    assert img.size == (128, 96) and np.asarray(img).std() > 10


# ------------------------------------------------------------------------------------------------ 16-bit PNG


def test_png16_hu_and_full_range(tmp_path):
    hu = np.array([[-1000, 0, 40, 80, 500]], dtype=np.int32)
    Image.fromarray((hu + 32768).astype(np.uint16)).save(tmp_path / "dl.png")
    assert Image.open(tmp_path / "dl.png").mode.startswith("I")  # really 16-bit on disk
    got = _grey(load_image(tmp_path / "dl.png", kind="png16_hu", window=(40, 80)))
    assert got[0].tolist() == [0, 0, 128, 255, 255]
    raw = np.array([[100, 1100, 4195]], dtype=np.uint16)  # 12-bit data: full-range rescale
    Image.fromarray(raw).save(tmp_path / "pc.png")
    assert _grey(load_image(tmp_path / "pc.png", kind="png16"))[0].tolist() == [0, 62, 255]
    assert _grey(load_image(tmp_path / "pc.png"))[0].tolist() == [0, 62, 255]  # guessed the same
    # DeepLesion Key_slices may be 8-bit renderings: detected and used as stored, not shifted by 32768
    Image.fromarray(np.array([[10, 200]], dtype=np.uint8)).save(tmp_path / "key8.png")
    assert _grey(load_image(tmp_path / "key8.png", kind="png16_hu"))[0].tolist() == [10, 200]
    # ... also when the converter passes the study's HU window (meaningless for grey levels)
    assert _grey(load_image(tmp_path / "key8.png", kind="png16_hu", window=(50, 450)))[0].tolist() == [
        10,
        200,
    ]


@pytest.mark.parametrize("window", [(50, 450), [50, 450], "50,450", " Abdomen ", "lung"])
def test_an_8bit_key_slice_ignores_an_hu_window_however_given(tmp_path, window):
    Image.fromarray(np.array([[10, 200]], dtype=np.uint8)).save(tmp_path / "key8.png")
    got = _grey(load_image(tmp_path / "key8.png", kind="png16_hu", window=window))
    assert got[0].tolist() == [10, 200]  # used as stored: the CLI's "50,450" / "lung" are HU windows too


def test_an_8bit_key_slice_keeps_grey_level_modes_and_names_a_bad_window(tmp_path):
    Image.fromarray(np.array([[10, 200]], dtype=np.uint8)).save(tmp_path / "key8.png")
    assert _grey(load_image(tmp_path / "key8.png", kind="png16_hu", window="minmax"))[0].tolist() == [0, 255]
    with pytest.raises(ValueError, match="unknown window 'lungs'"):
        load_image(tmp_path / "key8.png", kind="png16_hu", window="lungs")


def test_tiff_jpeg_png_and_mime(tmp_path):
    rgb = (np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.tif")
    Image.fromarray(rgb).save(tmp_path / "b.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "looks_like.png", format="JPEG")  # lying extension
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.tif")), rgb)
    assert load_image(tmp_path / "b.jpg").size == (4, 4)
    assert mime_type(tmp_path / "a.tif") == "image/tiff"
    assert mime_type(tmp_path / "looks_like.png") == "image/jpeg"
    assert mime_type(get_testdata_file("CT_small.dcm")) == "application/dicom"
    png = to_png_bytes(load_image(tmp_path / "a.tif"))
    assert mime_type(png) == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), rgb)


# ------------------------------------------------------------------------------------------------ errors


def test_corrupt_and_unknown_inputs_name_the_file(tmp_path):
    png = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match=r"trunc\.png: unreadable or truncated image"):
        load_image(png)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00\x01garbage" * 20)
    with pytest.raises(ImageLoadError, match=r"junk\.dcm: .*DICOM"):
        load_image(junk)
    nii = tmp_path / "broken.nii.gz"
    nii.write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(ImageLoadError, match=r"broken\.nii\.gz: not a readable NIfTI file"):
        load_image(nii)
    with pytest.raises(ImageLoadError, match=r"waveform_ecg\.dcm: no pixel data \(Modality ECG"):
        load_image(get_testdata_file("waveform_ecg.dcm"))
    with pytest.raises(ImageLoadError, match=r"MR_truncated\.dcm: pixel data cannot be decoded"):
        load_image(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(ImageLoadError, match=r"missing\.png: file not found"):
        load_image(tmp_path / "missing.png")


def test_bad_options_are_named(tmp_path):
    path = _ct(HU, tmp_path / "ct.dcm")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['slice_axis'\] for a dicom image"):
        load_image(path, slice_axis="axial")
    with pytest.raises(ValueError, match=r"unknown window 'lungs'.*lung, mediastinum"):
        load_image(path, window="lungs")
    with pytest.raises(ValueError, match="window width must be > 0"):
        resolve_window((40, 0))
    for bad in ((float("inf"), 1), (40, float("nan")), "1e999,400"):  # JSON's 1e999 parses as infinity
        with pytest.raises(ValueError, match="a window's center and width must be finite numbers"):
            resolve_window(bad)
    with pytest.raises(ImageLoadError, match="window='tags' but the header has no Window"):
        load_image(path, window="tags")


def test_unusable_voi_tags_fall_back_or_are_named(tmp_path):
    from cambrian_core.data.medimage import ImageLoadError, load_image

    src = get_testdata_file("CT_small.dcm")
    percentile = np.asarray(load_image(src, window="percentile").convert("L"))

    def variant(name, change):
        ds = pydicom.dcmread(src)
        change(ds)
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path)
        return path

    empty = variant("empty", lambda ds: (setattr(ds, "WindowCenter", 40), ds.add_new(0x00281051, "DS", None)))
    zero = variant("zero", lambda ds: (setattr(ds, "WindowCenter", 40), setattr(ds, "WindowWidth", 0)))
    for path in (empty, zero):  # auto: the tags cannot window it (PS3.3: width >= 1), so percentiles
        assert np.array_equal(np.asarray(load_image(path).convert("L")), percentile)
    with pytest.raises(
        ImageLoadError, match=r"empty.dcm: window='tags' but Window Center/Width .* present but empty"
    ):
        load_image(empty, window="tags")
    with pytest.raises(ImageLoadError, match=r"zero.dcm: window='tags' but Window Width \(0028,1051\) 0"):
        load_image(zero, window="tags")
    two = variant(
        "two", lambda ds: (setattr(ds, "WindowCenter", [40, 300]), setattr(ds, "WindowWidth", [400, 1500]))
    )
    assert load_image(two, voi_index=1).size == (128, 128)
    with pytest.raises(
        ImageLoadError, match=r"two.dcm: voi_index 2 is outside the 2 window\(s\) of the header"
    ):
        load_image(two, voi_index=2)
    with pytest.raises(ImageLoadError, match=r"badVR.dcm: invalid Number of Frames \(0028,0008\) '1A'"):
        load_image(get_testdata_file("badVR.dcm"))  # pydicom's own test file with a broken IS value


def test_a_multi_page_tiff_defaults_to_its_middle_page(tmp_path):
    from cambrian_core.data.medimage import load_image

    pages = [Image.fromarray(np.full((4, 4), v, dtype=np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])

    def grey(**kw):
        return int(np.asarray(load_image(tmp_path / "pages.tif", **kw).convert("L"))[0, 0])

    assert [grey(), grey(frame=0), grey(frame=2), grey(frame="middle")] == [20, 10, 30, 20]
