"""The pneumonia SR: highdicom reads back what we wrote, dicom3tools and DCMTK find it valid."""

from __future__ import annotations

import copy
import difflib
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from testkit.env import require_tool
from testkit.dicom_factory import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION_STORAGE,
    encode_with_tool,
    make_dataset,
    synthetic_radiograph,
)
from pydicom.uid import generate_uid

from trainer.model_info import ModelInfo, new_model_uid
from worker.cli.wrap import DX_FOR_PRESENTATION, wrap_image_as_dicom
from worker.sr import (
    CERTAINTY_OF_FINDING,
    PNEUMONIA,
    PROCESSING_EQUIPMENT,
    SR_SERIES_DESCRIPTION,
    PneumoniaReport,
    build_pneumonia_sr,
    clear_template_cache,
    encode_pneumonia_sr,
    read_pneumonia_sr,
    SOURCE_TAGS,
    pack_source,
    source_dataset,
    sr_file_bytes,
    template_cache_info,
    unpack_source,
)
from worker.errors import UnsupportedDependency
from worker.scoring.eligibility import SCORABLE_SOP_CLASSES, read_header

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def model() -> ModelInfo:
    return ModelInfo(arch="simplecnn", name="cxr-pneumonia-test", version="1.2.3", threshold=0.42, uid=new_model_uid())


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two synthetic 8-bit chest films (testkit.dicom_factory) of one patient, wrapped as DX images of
    one study the way `send --wrap` wraps a film, written to disk."""
    out = tmp_path_factory.mktemp("wrapped")
    study_uid = pydicom.uid.generate_uid()
    paths = []
    for index in range(2):
        film = out / f"film{index}.png"
        cv2.imwrite(str(film), synthetic_radiograph(256, 200, bits_stored=8, seed=index).astype(np.uint8))
        ds = wrap_image_as_dicom(film, patient_id="person-test", study_uid=study_uid)
        path = out / f"dx{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def sources(wrapped: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in wrapped]


@pytest.fixture(scope="module")
def sr_file(sources: list[pydicom.Dataset], model: ModelInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sr = build_pneumonia_sr(PneumoniaReport(sources, 0.8731, True, model))
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dicom3tools' IOD verifier (it reports on stderr)."""
    require_tool("dciodvfy")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    for line in warnings:
        print(f"dciodvfy {path.name}: {line}")
    return errors, warnings


@pytest.mark.parametrize("probability, positive", [(0.8731, True), (0.0213, False), (0.0, False), (1.0, True)])
def test_read_back_through_highdicom(sources, model, probability, positive, tmp_path):
    sr = build_pneumonia_sr(PneumoniaReport(sources, probability, positive, model))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    result = read_pneumonia_sr(pydicom.dcmread(path))
    assert result["finding"] == "Pneumonia"
    assert result["presence"] == ("present" if positive else "absent")
    assert result["positive"] is positive
    assert result["probability"] == pytest.approx(probability, abs=1e-9)
    assert result["model_uid"] == model.uid
    assert result["model_name"] == model.name and result["model_version"] == model.version
    assert result["referenced_sop_instance_uids"] == [str(ds.SOPInstanceUID) for ds in sources]


def test_header_same_study_new_series_air_equipment(sources, model, sr_file):
    sr = pydicom.dcmread(sr_file)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in sources}
    assert sr.PatientID == "person-test" and sr.PatientName == sources[0].PatientName
    assert (sr.SeriesNumber, sr.SeriesDescription) == (9901, SR_SERIES_DESCRIPTION)
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    ai = [item for item in sr.ContributingEquipmentSequence if item.get("DeviceUID") == model.uid]
    assert len(ai) == 1
    purpose = ai[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeValue) == (PROCESSING_EQUIPMENT.scheme_designator, PROCESSING_EQUIPMENT.value)
    assert (ai[0].ManufacturerModelName, ai[0].SoftwareVersions) == (model.name, model.version)
    evidence = {
        sop.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in sources}


def test_only_standard_coding_schemes(sr_file):
    schemes: set[str] = set()

    def walk(ds: pydicom.Dataset) -> None:
        for element in ds:
            if element.keyword == "CodingSchemeDesignator":
                schemes.add(str(element.value))
            elif element.VR == "SQ":
                for item in element.value:
                    walk(item)

    walk(pydicom.dcmread(sr_file))
    assert {PNEUMONIA.scheme_designator, CERTAINTY_OF_FINDING.scheme_designator} <= schemes
    assert schemes <= {"DCM", "SCT", "UCUM", "RFC5646"}, schemes  # no private (99...) schemes


def test_given_uids_make_the_sr_reproducible(sources, model):
    kwargs = dict(sr_series_uid="1.2.826.0.1.3680043.10.1.1", sr_instance_uid="1.2.826.0.1.3680043.10.1.2")
    first = build_pneumonia_sr(PneumoniaReport(sources, 0.5, True, model, series_number=9902, instance_number=3,
                                               **kwargs))
    second = build_pneumonia_sr(PneumoniaReport(sources, 0.5, True, model, series_number=9902, instance_number=3,
                                                **kwargs))
    assert first.SeriesInstanceUID == second.SeriesInstanceUID == kwargs["sr_series_uid"]
    assert first.SOPInstanceUID == second.SOPInstanceUID == kwargs["sr_instance_uid"]
    assert (first.SeriesNumber, first.InstanceNumber) == (9902, 3)
    assert str(first.ContentSequence) == str(second.ContentSequence)  # same tracking UID, same tree


def test_sources_without_geometry_or_type2_attributes(sources, model):
    bare = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "Modality", "PatientID"):
        setattr(bare, keyword, sources[0].get(keyword))
    result = read_pneumonia_sr(build_pneumonia_sr(PneumoniaReport([bare], 0.3, False, model)))
    assert result["referenced_sop_instance_uids"] == [sources[0].SOPInstanceUID]


HIGHDICOM_EQUIPMENT = "Highdicom open-source contributors"


def _bytes_with_fixed_times(sr: pydicom.Dataset | bytes) -> bytes:
    """The SR's file bytes with the creation dates/times (the only values taken from the clock) fixed.

    Only highdicom's own Contributing Equipment item has its Contribution DateTime from the clock;
    the acquisition equipment item's comes from the source image and must match as it is.
    """
    if isinstance(sr, bytes):
        sr = pydicom.dcmread(io.BytesIO(sr))
    for keyword in ("ContentDate", "InstanceCreationDate", "SeriesDate"):
        if keyword in sr:
            setattr(sr, keyword, "20000101")
    for keyword in ("ContentTime", "InstanceCreationTime", "SeriesTime"):
        if keyword in sr:
            setattr(sr, keyword, "000000")
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item and item.Manufacturer == HIGHDICOM_EQUIPMENT:
            item.ContributionDateTime = "20000101000000"
    return sr_file_bytes(sr)


@pytest.mark.parametrize("case", ["one", "two", "bare"])
def test_fast_path_gives_the_same_bytes_as_highdicom_unabridged(sources, model, case):
    """build_pneumonia_sr hands highdicom a content stub and attaches the tree itself (2x faster):
    the document must be byte-identical to the one highdicom builds from the whole tree."""
    chosen = {"one": sources[:1], "two": sources}.get(case)
    if chosen is None:  # no geometry, no Type 2 attributes
        bare = pydicom.Dataset()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns",
                        "Modality", "PatientID"):
            setattr(bare, keyword, sources[0].get(keyword))
        chosen = [bare]
    kwargs = dict(sr_series_uid="1.2.826.0.1.3680043.10.1.1", sr_instance_uid="1.2.826.0.1.3680043.10.1.2",
                  instance_number=2)
    fast = build_pneumonia_sr(PneumoniaReport(chosen, 0.8731, True, model, **kwargs))
    full = build_pneumonia_sr(PneumoniaReport(chosen, 0.8731, True, model, **kwargs), reference=True)
    assert str(fast.content) == str(full.content)  # .content (highdicom's parsed tree) too
    assert _bytes_with_fixed_times(fast) == _bytes_with_fixed_times(full)


def test_invalid_inputs_are_rejected(sources, model):
    with pytest.raises(ValueError, match="at least one"):
        build_pneumonia_sr(PneumoniaReport([], 0.5, True, model))
    for probability in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            build_pneumonia_sr(PneumoniaReport(sources, probability, True, model))
    other = copy.deepcopy(sources[1])
    other.StudyInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="one study"):
        build_pneumonia_sr(PneumoniaReport([sources[0], other], 0.5, True, model))
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        build_pneumonia_sr(PneumoniaReport(sources, 0.5, True, model, sr_instance_uid="not-a-uid"))
    no_uid = copy.deepcopy(sources[0])
    del no_uid.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build_pneumonia_sr(PneumoniaReport([no_uid], 0.5, True, model))


def test_sr_passes_dciodvfy(sr_file):
    errors, _ = dciodvfy(sr_file)
    assert errors == []


def test_sr_passes_dsrdump(sr_file):
    require_tool("dsrdump")
    run = subprocess.run(["dsrdump", str(sr_file)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", run.stderr
    assert '"Pneumonia"' in run.stdout and "Certainty of Finding" in run.stdout


def test_wrapped_dx_images_pass_dciodvfy(wrapped):
    for path in wrapped:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == DX_FOR_PRESENTATION
        assert (ds.Modality, ds.PhotometricInterpretation, ds.BitsStored, ds.ViewPosition) == ("DX", "MONOCHROME2", 8, "AP")
        errors, _ = dciodvfy(path)
        assert errors == [], path


# --- encode_pneumonia_sr: the template path gives the reference bytes ------------------------------
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Probabilities the studies of one shape cycle through (edges, tiny, long decimals).
PROBABILITIES = (0.8731, 0.0213, 0.0, 1.0, 1e-7, 0.123456789, 0.5)
JAPANESE_NAME = "Yamada{seed}^Tarou=山田^太郎=やまだ^たろう"
#: Specific Character Set -> (patient name, institution name) with text that needs it.
NAMES: dict[str | tuple[str, ...] | None, tuple[str, str]] = {
    None: ("Doe{seed}^Jane", "General Hospital {seed}"),
    "ISO_IR 100": ("Müller{seed}^Jürgen", "Hôpital Zürich {seed}"),
    "ISO_IR 192": ("Ωμέγα{seed}^Άλφα", "Νοσοκομείο {seed}"),
    ("", "ISO 2022 IR 87"): (JAPANESE_NAME, "Tokyo Hospital {seed}"),  # "\\ISO 2022 IR 87": highdicom refuses
    ("ISO 2022 IR 6", "ISO 2022 IR 87"): (JAPANESE_NAME, "Osaka Hospital {seed}"),
}
ORIENTATIONS = (["L", "F"], ["A", "FR"], ["R", "H"])


@dataclass(frozen=True)
class Shape:
    """What stays the same across the studies of one template; make_study varies everything else."""

    images: tuple[tuple[str, str, str], ...]  # (SOP Class UID, photometric, series key) per image
    charset: str | tuple[str, ...] | None = "ISO_IR 100"
    optional: bool = True  # birth date, accession, institution, acquisition equipment
    orientation: bool = True  # Patient Orientation; without it the library entry has no TID 1603 part
    spacing: bool = True  # Imager Pixel Spacing
    frames_of_reference: bool = False
    bad_dates: bool = False
    extras: bool = False  # more Patient/Study attributes: sequences, multi-valued PN, DS, AS
    implicit_vr: bool = False
    templated: bool = True  # False: the reference builds every study of this shape
    conformant: bool = True  # False: the reference SR itself has dciodvfy errors (source values it keeps)
    hostile: str | None = None  # a key of HOSTILE: source values that break their VR


DX1 = (DX_FOR_PRESENTATION_STORAGE, "MONOCHROME2", "a")
SHAPES = {
    "dx-one": Shape((DX1,)),
    "dx-two-monochrome1": Shape(((DX_FOR_PRESENTATION_STORAGE, "MONOCHROME1", "a"),) * 2),
    "three-cr-dx-two-series": Shape(((CR_IMAGE_STORAGE, "MONOCHROME1", "a"), (CR_IMAGE_STORAGE, "MONOCHROME2", "a"),
                                     (DX_FOR_PRESENTATION_STORAGE, "MONOCHROME2", "b"))),
    "frames-of-reference": Shape((DX1, DX1), frames_of_reference=True),
    "dx-no-orientation": Shape((DX1, DX1), orientation=False),
    "minimal-no-geometry": Shape((DX1,), charset=None, optional=False, orientation=False, spacing=False),
    "bad-dates": Shape((DX1,), bad_dates=True),
    "utf8": Shape((DX1, (CR_IMAGE_STORAGE, "MONOCHROME1", "b")), charset="ISO_IR 192"),
    "jis-first-empty": Shape((DX1,), charset=("", "ISO 2022 IR 87")),
    "jis-with-ir6": Shape((DX1, DX1), charset=("ISO 2022 IR 6", "ISO 2022 IR 87")),
    "implicit-vr-extras": Shape((DX1, DX1), extras=True, implicit_vr=True),
    "ct": Shape(((CT_IMAGE_STORAGE, "MONOCHROME2", "a"),), templated=False),  # TID 1604 descriptors not mapped
    "overlong-values-bad-age": Shape((DX1, DX1), hostile="overlong"),
    "invalid-utf8-name": Shape((DX1,), charset="ISO_IR 192", hostile="invalid-utf8"),
    "8-bit-text-without-charset": Shape((DX1,), charset=None, hostile="no-charset"),
}
#: What each hostile shape's source holds (set after make_study's ordinary values; bytes patched in).
HOSTILE = {
    # PN 64 per group, SH 16, LO 64, ST 1024; AS is nnnD/W/M/Y; a control character in an LT.
    "overlong": dict(PatientName="Jane{seed}^L" + "ong" * 1700, AccessionNumber="ACC{seed}" + "9" * 30,
                     StudyDescription="XR CHEST {seed} " + "very " * 60, InstitutionName="Hospital {seed} " * 12,
                     InstitutionAddress="Street {seed}\r\n" * 200, PatientAge="{seed} years",
                     OtherPatientNames=["Other{seed}^" + "x" * 90, "Fine^Name"],
                     PatientComments="comment {seed}\x07bell"),
    # Invalid UTF-8 under ISO_IR 192 (a lone continuation byte and an 0xFF), patched into the file.
    "invalid-utf8": dict(PatientName="Bad{seed}^QQ", StudyDescription="Study RR {seed}"),
    # Latin-1 bytes in a source that declares no Specific Character Set (default repertoire: ASCII only).
    "no-charset": dict(PatientName="M\xfcller{seed}^J\xfcrgen"),
}
HOSTILE_BYTES = {"invalid-utf8": ((b"^QQ", b"^\x80\xff"), (b"RR", b"\xc3\x28"))}


def make_study(shape: Shape, seed: int) -> list[pydicom.Dataset]:
    """Headers of one study of `shape`, as the worker reads them (stop_before_pixels), all of whose
    per-study values (UIDs, names, dates, sizes, spacing, orientation, equipment) depend on `seed`."""
    study_uid = generate_uid()
    series = {key: generate_uid() for *_, key in shape.images}
    patient_name, institution = (text.format(seed=seed) for text in NAMES[shape.charset])
    headers = []
    for index, (sop_class, photometric, key) in enumerate(shape.images):
        ds = make_dataset(np.zeros((20 + seed + index, 16 + 3 * seed), np.uint16), bits_stored=12,
                          photometric=photometric, sop_class=sop_class)
        if shape.charset is not None:
            ds.SpecificCharacterSet = list(shape.charset) if isinstance(shape.charset, tuple) else shape.charset
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series[key]
        ds.PatientID, ds.PatientName, ds.PatientSex = f"PID{seed:04d}", patient_name, "FM"[seed % 2]
        ds.StudyDate, ds.StudyTime = f"2024{seed % 12 + 1:02d}{seed % 28 + 1:02d}", f"{10 + seed % 10}3015"
        ds.StudyID, ds.StudyDescription, ds.ReferringPhysicianName = str(seed), f"XR CHEST {seed}", f"Ref{seed}^A"
        if shape.optional:
            ds.PatientBirthDate, ds.AccessionNumber = f"19{50 + seed}0704", f"ACC{seed}"
            ds.InstitutionName = institution
            ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = "ACME Imaging", f"DR-{seed}", f"ROOM{seed}"
            ds.SoftwareVersions, ds.DeviceSerialNumber = ["4.1", f"fw{seed}"], f"SN{seed}"
            ds.AcquisitionDateTime = f"2024010{seed % 9 + 1}1010{seed % 60:02d}.25"
        if shape.orientation:
            ds.PatientOrientation = ORIENTATIONS[(seed + index) % len(ORIENTATIONS)]
        if shape.spacing:
            ds.ImagerPixelSpacing = [0.139 + 0.001 * seed, 0.15 + 0.0123 * seed]  # anisotropic: rows vs columns
        if shape.frames_of_reference:
            ds.FrameOfReferenceUID = generate_uid()
        if shape.bad_dates:
            ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "05.04.1923", "2024-01-02", "12:30"
            ds.AcquisitionDateTime = f"2024-01-02 10:{seed:02d}"  # highdicom copies it into the equipment item
        if shape.extras:
            ds.PatientAge, ds.PatientWeight, ds.PatientComments = f"{30 + seed:03d}Y", 60.5 + seed, f"note {seed}"
            ds.OtherPatientIDsSequence = [pydicom.Dataset()]
            ds.OtherPatientIDsSequence[0].update({"PatientID": f"OTHER{seed}", "IssuerOfPatientID": "HOSP",
                                                  "TypeOfPatientID": "TEXT"})
            ds.ReferencedStudySequence = [pydicom.Dataset()]  # a copied reference: not a library image
            ds.ReferencedStudySequence[0].update({"ReferencedSOPClassUID": "1.2.840.10008.3.1.2.3.1",
                                                  "ReferencedSOPInstanceUID": generate_uid()})
            ds.PhysiciansOfRecord = [f"Doe{seed}^A", "Roe^B"]
        if shape.implicit_vr:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        for keyword, value in HOSTILE.get(shape.hostile, {}).items():
            setattr(ds, keyword, [v.format(seed=seed) for v in value] if isinstance(value, list)
                    else value.format(seed=seed))
        if sop_class == CT_IMAGE_STORAGE:
            ds.Modality, ds.FrameOfReferenceUID, ds.SliceThickness = "CT", generate_uid(), 1.25
            ds.PixelSpacing, ds.ImagePositionPatient = [0.7, 0.8], [-100.0, -120.5, 30.0 + seed]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        for old, new in HOSTILE_BYTES.get(shape.hostile, ()):
            assert data.count(old) == 1 and len(old) == len(new)
            data = data.replace(old, new)
        headers.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))
    return headers


def sr_arguments(seed: int) -> dict:
    """The per-study arguments the pipeline passes (derived UIDs, revision as instance number)."""
    return dict(series_number=9900 + seed, instance_number=seed, sr_series_uid=generate_uid(),
                sr_instance_uid=generate_uid())


def assert_same_sr(fast: bytes, reference: bytes) -> None:
    """Equal up to the clock values; on failure the element dumps' diff says where."""
    fast, reference = _bytes_with_fixed_times(fast), _bytes_with_fixed_times(reference)
    if fast != reference:
        dumps = [str(pydicom.dcmread(io.BytesIO(data))).splitlines() for data in (reference, fast)]
        diff = "\n".join(difflib.unified_diff(*dumps, "reference", "fast", lineterm="", n=2))
        pytest.fail(f"template SR differs from the reference:\n{diff or '(same dump; bytes differ)'}")


@pytest.fixture()
def fresh_templates():
    clear_template_cache()
    yield
    clear_template_cache()


@pytest.mark.parametrize("positive", [True, False], ids=["positive", "negative"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_encode_gives_the_reference_bytes(model, name, positive, fresh_templates):
    """Study 1 of a shape builds its template from the reference; studies 2-4 (every per-study value
    different) are rendered from it, and all must equal build_pneumonia_sr + save_as."""
    shape = SHAPES[name]
    for seed in (1, 2, 3, 4):
        sources = make_study(shape, seed)
        probability, arguments = PROBABILITIES[(seed + positive) % len(PROBABILITIES)], sr_arguments(seed)
        fast = encode_pneumonia_sr(PneumoniaReport(sources, probability, positive, model, **arguments))
        reference = sr_file_bytes(build_pneumonia_sr(PneumoniaReport(sources, probability, positive, model,
                                                                     **arguments)))
        assert_same_sr(fast, reference)
    info = template_cache_info()
    assert (info["template"], info["reference"]) == ((3, 1) if shape.templated else (0, 4)), info


def test_encode_keeps_settings_apart(model, fresh_templates):
    """Manufacturer, software version and model are part of the shape, not frozen from the first study."""
    other_model = ModelInfo(arch="simplecnn", name="cxr-other", version="9", threshold=0.3, uid=new_model_uid())
    for seed, (m, manufacturer, version) in enumerate([(model, "cxr-worker", "1.0"), (model, "Site AI", "1.0"),
                                                       (other_model, "cxr-worker", "1.0"),
                                                       (model, "cxr-worker", "2.0"), (model, "Site AI", "1.0")]):
        sources, arguments = make_study(SHAPES["dx-one"], seed + 1), sr_arguments(seed + 1)
        report = PneumoniaReport(sources, 0.6, True, m, manufacturer=manufacturer, software_version=version,
                                 **arguments)
        fast = encode_pneumonia_sr(report)
        reference = build_pneumonia_sr(report)
        assert_same_sr(fast, sr_file_bytes(reference))
    assert template_cache_info()["template"] == 1  # only the repeated ("Site AI", model, "1.0")


def test_shapes_never_share_a_template(model, fresh_templates):
    """All shapes through one cache, twice: each study must get its own shape's document. (bad-dates
    has dx-one's shape: its odd dates are values, so it may already use that template in round 1.)"""
    for seed in (5, 6):
        rendered = template_cache_info()["template"]
        for shape in SHAPES.values():
            sources, arguments = make_study(shape, seed), sr_arguments(seed)
            fast = encode_pneumonia_sr(PneumoniaReport(sources, 0.7, True, model, **arguments))
            reference = build_pneumonia_sr(PneumoniaReport(sources, 0.7, True, model, **arguments))
            assert_same_sr(fast, sr_file_bytes(reference))
    assert template_cache_info()["template"] - rendered == sum(shape.templated for shape in SHAPES.values())


def test_encode_leaves_the_sources_as_they_were(model, fresh_templates):
    """The SR copies the sources before blanking bad dates or hiding missing geometry (copy.copy of a
    Dataset would share its elements with the caller's)."""
    for seed in (1, 2):
        sources = make_study(SHAPES["bad-dates"], seed)
        bare = make_study(SHAPES["dx-no-orientation"], seed)
        before = [str(ds) for ds in sources + bare]
        encode_pneumonia_sr(PneumoniaReport(sources, 0.5, True, model, **sr_arguments(seed)))
        encode_pneumonia_sr(PneumoniaReport(bare, 0.5, True, model, **sr_arguments(seed)))
        build_pneumonia_sr(PneumoniaReport(bare, 0.5, True, model))
        assert [str(ds) for ds in sources + bare] == before
        assert (sources[0].PatientBirthDate, bare[0].Modality) == ("05.04.1923", "DX")


@pytest.mark.parametrize("name", [n for n, shape in SHAPES.items() if shape.templated])
def test_template_sr_reads_back_and_passes_dciodvfy(model, name, fresh_templates, tmp_path):
    """A rendered SR reads back through highdicom, and dciodvfy finds no error (bad-dates included:
    non-conformant source dates, the Acquisition DateTime highdicom copies among them, are left empty)."""
    shape = SHAPES[name]
    encode_pneumonia_sr(PneumoniaReport(make_study(shape, 1), 0.25, True, model, **sr_arguments(1)))  # the template
    sources, arguments = make_study(shape, 2), sr_arguments(2)
    data = encode_pneumonia_sr(PneumoniaReport(sources, 0.8731, True, model, **arguments))
    assert template_cache_info()["template"] == 1
    result = read_pneumonia_sr(pydicom.dcmread(io.BytesIO(data)))
    assert (result["presence"], result["positive"]) == ("present", True)
    assert result["probability"] == pytest.approx(0.8731, abs=1e-9)
    assert (result["model_uid"], result["model_name"], result["model_version"]) == (
        model.uid, model.name, model.version)
    assert result["referenced_sop_instance_uids"] == [str(ds.SOPInstanceUID) for ds in sources]
    assert result["study_instance_uid"] == sources[0].StudyInstanceUID
    assert result["sr_instance_uid"] == arguments["sr_instance_uid"]
    if shape.conformant:
        path = tmp_path / "sr.dcm"
        path.write_bytes(data)
        errors, _ = dciodvfy(path)
        assert errors == []


HOSTILE_SHAPES = [name for name, shape in SHAPES.items() if shape.hostile]


@pytest.mark.parametrize("name", HOSTILE_SHAPES)
def test_source_values_that_break_their_vr_are_made_valid_or_left_out(model, name, fresh_templates, tmp_path):
    """Both SR paths (the reference, then a template-rendered study) pass dciodvfy with 0 errors whatever the
    source held: too long -> truncated to the VR's limit, bad Patient's Age, control characters, invalid
    UTF-8, 8-bit text without a character set -> empty; never the source's bytes verbatim."""
    shape = SHAPES[name]
    for seed in (1, 2):  # 1: the reference builds it (and the template); 2: rendered from the template
        sources = make_study(shape, seed)
        data = encode_pneumonia_sr(PneumoniaReport(sources, 0.6, True, model, **sr_arguments(seed)))
        path = tmp_path / f"sr{seed}.dcm"
        path.write_bytes(data)
        errors, _ = dciodvfy(path)
        assert errors == [], errors
        sr = pydicom.dcmread(io.BytesIO(data))
        source = sources[0]
        if shape.hostile == "overlong":
            assert str(sr.PatientName) == str(source.PatientName)[:64]
            assert sr.AccessionNumber == source.AccessionNumber[:16]
            assert sr.StudyDescription == source.StudyDescription[:64].rstrip(" ")
            assert sr.OtherPatientNames == [str(source.OtherPatientNames[0])[:64], "Fine^Name"]
            assert not sr.get("PatientAge") and not sr.get("PatientComments")
            acquisition = sr.ContributingEquipmentSequence[0]
            assert acquisition.InstitutionName == source.InstitutionName[:64].rstrip(" ")
            assert acquisition.InstitutionAddress == source.InstitutionAddress[:1024]  # CR LF are allowed in ST
        else:
            assert str(sr.PatientName) == ""
            assert b"\xef\xbf\xbd" not in data and b"\x80\xff" not in data and b"\xfc" not in data
        if shape.hostile == "invalid-utf8":
            assert sr.StudyDescription == "" and sr.SpecificCharacterSet == "ISO_IR 192"
    assert template_cache_info()["template"] == 1


def test_valid_source_values_rules():
    """The rules of worker/sr/values.py one by one, on a data set; valid values are never touched."""
    from worker.sr.values import valid_source_values

    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "A" * 64 + "=" + "B" * 70 + "=" + "C^D"  # PS3.5: 64 characters per component group
    ds.OtherPatientNames = ["A^B^C^D^E^F", "Fine"]  # more than 5 components: not a name
    ds.PatientAge, ds.PatientSize, ds.PatientSex = "045Y", "1.75", "F"
    ds.StudyDescription = "Ωμέγα" * 20  # 100 characters, 200 bytes: cut at a character, not a byte
    ds.InstitutionAddress = "Street 1\r\nTown\tZone"
    ds.AdditionalPatientHistory = "line 1\r\nline 2"  # LT: CR LF allowed
    ds.PatientComments = "tab\x00nul"
    ds.ResponsiblePerson = "Esc\x1b$B^X"  # ESC: ISO 2022 code extension, allowed
    changes = valid_source_values(ds)
    assert changes == {"PatientName": "A" * 64 + "=" + "B" * 64 + "=C^D", "OtherPatientNames": None,
                       "StudyDescription": "Ωμέγα" * 12 + "Ωμέγ", "PatientComments": None}
    ds.PatientAge, ds.StudyDate, ds.StudyTime, ds.PatientSex = "45", "20240230", "25:00", "female"
    assert valid_source_values(ds).keys() >= {"PatientAge", "StudyDate", "StudyTime", "PatientSex"}
    raw = b"".join((tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little") + vr
                   + len(v).to_bytes(2, "little") + v for tag, vr, v in ((0x00101020, b"DS", b"abc "), (0x00101030, b"DS", b"NaN "),
                                          (0x00101010, b"AS", b"045Y")))
    read = pydicom.filereader.read_dataset(pydicom.filebase.DicomBytesIO(raw), False, True)  # as a file gives them
    assert valid_source_values(read) == {"PatientSize": None, "PatientWeight": None}
    for shape in SHAPES.values():  # the ordinary shapes' values are valid: nothing changes
        if not shape.hostile and not shape.bad_dates:
            assert all(valid_source_values(ds) == {} for ds in make_study(shape, 3))


def test_encode_rejects_what_build_rejects(model, fresh_templates):
    sources = make_study(SHAPES["dx-two-monochrome1"], 1)
    encode_pneumonia_sr(PneumoniaReport(sources, 0.5, True, model, **sr_arguments(1)))  # the shape now has a template
    with pytest.raises(ValueError, match="at least one"):
        encode_pneumonia_sr(PneumoniaReport([], 0.5, True, model))
    for probability in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            encode_pneumonia_sr(PneumoniaReport(sources, probability, True, model))
    other = copy.deepcopy(sources[1])
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="one study"):
        encode_pneumonia_sr(PneumoniaReport([sources[0], other], 0.5, True, model))
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        encode_pneumonia_sr(PneumoniaReport(sources, 0.5, True, model, sr_instance_uid="not-a-uid"))


def test_patient_sex_outside_the_defined_terms_still_gets_an_sr(model, fresh_templates):
    """Patient's Sex "U" (not a DICOM defined term, common in the wild) made highdicom refuse the
    whole SR; it is left empty (Type 2) instead, on both paths."""
    for seed in (2, 3):
        odd = make_study(SHAPES["dx-two-monochrome1"], seed)
        odd[0].PatientSex = "U"
        arguments = sr_arguments(seed)
        fast = encode_pneumonia_sr(PneumoniaReport(odd, 0.5, True, model, **arguments))
        reference = build_pneumonia_sr(PneumoniaReport(odd, 0.5, True, model, **arguments))
        assert reference.PatientSex in (None, "")
        assert_same_sr(fast, sr_file_bytes(reference))
        assert odd[0].PatientSex == "U"  # the caller's header is left alone


# --- The package's dependencies: no torch, a checked highdicom ---------------------------------------
def test_import_worker_sr_loads_no_torch():
    """The SR needs the model's metadata only (trainer.model_info), not torch (seconds to import)."""
    code = "import worker.sr, sys; assert 'torch' not in sys.modules and 'torchvision' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 0, run.stderr


def test_highdicom_outside_the_checked_minor_version_is_refused():
    from worker.sr._highdicom import TESTED_MINOR, check_version

    tested = ".".join(map(str, TESTED_MINOR))
    check_version(f"{tested}.0")
    check_version(f"{tested}.7rc1")
    for version in (f"{TESTED_MINOR[0]}.{TESTED_MINOR[1] + 1}.0", f"{TESTED_MINOR[0]}.{TESTED_MINOR[1] - 1}.3",
                    f"{TESTED_MINOR[0] + 1}.{TESTED_MINOR[1]}.0", "unknown"):
        with pytest.raises(UnsupportedDependency) as raised:
            check_version(version)
        assert f"highdicom {version} is installed" in str(raised.value) and f"{tested}.x" in str(raised.value)


def test_report_checks_name_their_argument(sources, model):
    for kwargs, argument in [(dict(series_number=0), "series_number"), (dict(instance_number=0), "instance_number"),
                             (dict(sr_series_uid="2.25.1", sr_instance_uid="2.25.1"), "sr_instance_uid")]:
        with pytest.raises(ValueError, match=f'"{argument}"'):
            PneumoniaReport(sources, 0.5, True, model, **kwargs)
    with pytest.raises(TypeError, match='"model"'):
        PneumoniaReport(sources, 0.5, True, {"uid": model.uid})
    report = PneumoniaReport(sources, 0.5, 1, model)
    assert report.positive is True and len({report.sr_series_uid, report.sr_instance_uid}) == 2


# --- What the SR reads from its sources, kept at receive time ----------------------------------------
class RecordingDataset(pydicom.Dataset):
    """A source whose every attribute lookup (present or not) is noted in ``asked``; copies share it."""

    def __init__(self, source: pydicom.Dataset, asked: set) -> None:
        super().__init__()
        for element in source:
            self.add(element)
        self.asked = asked

    def _note(self, key) -> None:
        try:
            self.asked.add(pydicom.tag.Tag(key))
        except (ValueError, TypeError, OverflowError):
            pass

    def __getattr__(self, name):
        if pydicom.datadict.tag_for_keyword(name) is not None:
            self._note(name)
        return super().__getattr__(name)

    def __getitem__(self, key):
        if not isinstance(key, slice):
            self._note(key)
        return super().__getitem__(key)

    def __contains__(self, name) -> bool:
        self._note(name)
        return super().__contains__(name)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def get_item(self, key, *args, **kwargs):
        self._note(key)
        return super().get_item(key, *args, **kwargs)

    def __iter__(self):  # reading every element: note them all
        self.asked.update(self.keys())
        return super().__iter__()


#: A study of every SOP class the worker scores (SHAPES covers CR and DX For Presentation).
SCORABLE_SHAPES = {f"sop-{sop}": Shape(((sop, "MONOCHROME2", "a"),) * 2) for sop in SCORABLE_SOP_CLASSES}


def test_the_sr_reads_nothing_outside_source_tags(model, fresh_templates):
    """Whatever build_pneumonia_sr, the template and highdicom look up on a source (patient/study
    modules, image library, equipment) is among the attributes the receiver keeps."""
    asked: set = set()
    for shape in (*SHAPES.values(), *SCORABLE_SHAPES.values()):
        for seed in (1, 2):  # the reference builds the template, the template renders
            recording = [RecordingDataset(ds, asked) for ds in make_study(shape, seed)]
            encode_pneumonia_sr(PneumoniaReport(recording, 0.5, True, model, **sr_arguments(seed)))
            build_pneumonia_sr(PneumoniaReport(recording, 0.5, True, model), reference=True)
    assert template_cache_info()["template"] > 0
    assert asked, "nothing recorded"
    outside = sorted(pydicom.datadict.keyword_for_tag(tag) or str(tag) for tag in asked - set(SOURCE_TAGS))
    assert outside == []


#: Transfer syntaxes other than the shape's own that the kept attributes are packed in (the file's
#: own encoding), made by DCMTK (testkit.dicom_factory.encode_with_tool).
SYNTAXES = {"implicit-le": "dcmtk-implicit", "explicit-be": "dcmtk-big-endian", "deflated": "dcmtk-deflated"}


def write_study(shape: Shape, seed: int, folder: Path, syntax: str | None = None) -> list[Path]:
    """make_study's images as files, with attributes the SR does not read (private, pixel module...)."""
    paths = []
    for index, ds in enumerate(make_study(shape, seed)):
        ds.add_new(0x00090010, "LO", "ACME 1.1")  # a private block
        ds.add_new(0x00091001, "LO", f"private {seed}")
        ds.ImageComments, ds.DerivationDescription = f"comment {seed}", "none"
        ds.WindowCenter, ds.WindowWidth = 2048.0, 4096.0
        path = folder / f"{seed}-{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if syntax is not None:
            require_tool("dcmconv")
            path = encode_with_tool(SYNTAXES[syntax], path, folder / f"{seed}-{index}-{syntax}.dcm")
        paths.append(path)
    return paths


def kept_sources(paths: list[Path]) -> list[pydicom.Dataset]:
    """The sources as the scorer gets them: the receiver's one parse, packed, unpacked."""
    return [source_dataset(pack_source(read_header(p, SOURCE_TAGS).dataset), p) for p in paths]


@pytest.mark.parametrize("name", list(SHAPES))
def test_sr_from_kept_attributes_equals_sr_from_the_file(model, name, fresh_templates, tmp_path):
    shape = SHAPES[name]
    for seed in (1, 2, 3):
        paths = write_study(shape, seed, tmp_path)
        from_file = [source_dataset(None, p) for p in paths]  # rows stored before the column: the file
        assert all("ImageComments" in ds for ds in from_file)
        kept = kept_sources(paths)
        assert not any("ImageComments" in ds or 0x00091001 in ds for ds in kept)
        arguments = sr_arguments(seed)
        reference = sr_file_bytes(build_pneumonia_sr(PneumoniaReport(from_file, 0.3, False, model, **arguments)))
        assert_same_sr(sr_file_bytes(build_pneumonia_sr(PneumoniaReport(kept, 0.3, False, model, **arguments))),
                       reference)
        assert_same_sr(encode_pneumonia_sr(PneumoniaReport(kept, 0.3, False, model, **arguments)), reference)
    assert template_cache_info()["template"] == (2 if shape.templated else 0)


@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_kept_attributes_keep_the_file_encoding(model, syntax, tmp_path):
    paths = write_study(SHAPES["implicit-vr-extras"], 1, tmp_path, syntax)
    headers = [read_header(p, SOURCE_TAGS).dataset for p in paths]
    assert {ds.original_encoding for ds in headers} == {{"implicit-le": (True, True), "explicit-be": (False, False),
                                                         "deflated": (False, True)}[syntax]}
    packed = [pack_source(ds) for ds in headers]
    assert all(len(data) < 2000 for data in packed), [len(data) for data in packed]
    kept = [unpack_source(data) for data in packed]
    for header, ds in zip(headers, kept):
        assert ds.original_encoding == header.original_encoding
        assert set(ds.keys()) == set(header.keys()) & set(SOURCE_TAGS)
        assert str(ds.PatientName) == str(header.PatientName) and ds.OtherPatientIDsSequence[0].PatientID
    arguments = sr_arguments(1)
    from_file = [source_dataset(None, p) for p in paths]
    assert_same_sr(sr_file_bytes(build_pneumonia_sr(PneumoniaReport(kept, 0.9, True, model, **arguments))),
                   sr_file_bytes(build_pneumonia_sr(PneumoniaReport(from_file, 0.9, True, model, **arguments))))
    with pytest.raises(ValueError):
        unpack_source(b"?" + packed[0][1:])
    with pytest.raises(ValueError):
        pack_source(pydicom.Dataset())  # not read from a file: no encoding to keep


def test_the_receiver_keeps_what_the_sr_reads(model, tmp_path):
    """Receiver.store parses the header once and stores the SR's attributes with the row; the SR
    from the row equals the SR from the file, and a row without them (stored before) reads the file."""
    from sqlalchemy import select, update

    from worker.receiver import Received, Receiver
    from worker.settings import load_settings
    from worker.store.db import Database, Instance
    from worker.store.spool import Spool

    settings = load_settings(environ={"CXR_WORKER__STORAGE__DATA_DIR": f'"{tmp_path / "data"}"'})
    db = Database(settings.storage.url)
    try:
        receiver = Receiver(settings, db, Spool(settings.storage.data_dir))
        for path in write_study(SHAPES["three-cr-dx-two-series"], 1, tmp_path):
            assert receiver.store(path, "MODALITY") is Received.STORED
        with db.session() as s:
            rows = s.scalars(select(Instance).order_by(Instance.id)).all()
        assert len(rows) == 3 and all(row.sr_attributes for row in rows)
        arguments = sr_arguments(1)
        from_rows = [source_dataset(row.sr_attributes, row.path) for row in rows]
        from_files = [pydicom.dcmread(row.path, stop_before_pixels=True) for row in rows]
        reference = sr_file_bytes(build_pneumonia_sr(PneumoniaReport(from_files, 0.6, True, model, **arguments)))
        assert_same_sr(sr_file_bytes(build_pneumonia_sr(PneumoniaReport(from_rows, 0.6, True, model, **arguments))),
                       reference)
        with db.write() as conn:
            conn.execute(update(Instance).values(sr_attributes=None))
        with db.session() as s:
            old_rows = s.scalars(select(Instance).order_by(Instance.id)).all()
        from_old_rows = [source_dataset(row.sr_attributes, row.path) for row in old_rows]
        assert_same_sr(sr_file_bytes(build_pneumonia_sr(PneumoniaReport(from_old_rows, 0.6, True, model,
                                                                        **arguments))), reference)
    finally:
        db.dispose()


# -- the "not analysed" variants ------------------------------------------------------------------
def test_not_analysed_sr_is_valid_and_reads_back_with_its_reasons(sources, model, tmp_path):
    from worker.sr import DeclinedImage

    declined = [DeclinedImage(sources[0], ("out_of_distribution",), 41.5), DeclinedImage(sources[1], ("age", "undecodable"))]
    report = PneumoniaReport([], None, None, model, declined=declined, ood_threshold=30.3)
    assert not report.assessed
    path = tmp_path / "na.dcm"
    path.write_bytes(encode_pneumonia_sr(report))  # not templated: built by highdicom
    errors, _ = dciodvfy(path)
    assert errors == []
    back = read_pneumonia_sr(pydicom.dcmread(path))
    assert back["assessed"] is False and back["probability"] is None and back["presence"] is None
    assert back["summary"] == "No algorithms succeeded; without findings"
    assert back["not_assessed_reasons"] == ["out_of_distribution", "age", "undecodable"]
    assert [(d["sop_instance_uids"], d["reasons"], d["ood_score"]) for d in back["declined_images"]] == [
        ([str(sources[0].SOPInstanceUID)], ["out_of_distribution"], 41.5),
        ([str(sources[1].SOPInstanceUID)], ["age", "undecodable"], None)]
    sr = pydicom.dcmread(path)
    codes_used = {(item.CodingSchemeDesignator, item.CodeValue) for item in _walk_codes(sr)}
    assert {("DCM", "111017"), ("DCM", "111245"), ("DCM", "110531")} <= codes_used
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"


def test_mixed_study_sr_has_the_finding_and_the_declined_image(sources, model, tmp_path):
    from worker.sr import DeclinedImage

    report = PneumoniaReport([sources[0]], 0.91, True, model, declined=[DeclinedImage(sources[1], ("view_position",))])
    back = read_pneumonia_sr(build_pneumonia_sr(report))
    assert back["assessed"] is True and back["presence"] == "present" and back["probability"] == pytest.approx(0.91)
    assert back["summary"] == "Not all algorithms succeeded; with findings"
    assert back["referenced_sop_instance_uids"] == [str(sources[0].SOPInstanceUID)]
    assert back["declined_images"][0]["reasons"] == ["view_position"]


def test_not_analysed_report_checks_its_arguments(sources, model):
    from worker.sr import DeclinedImage

    with pytest.raises(ValueError, match='"probability" and "positive" must be None'):
        PneumoniaReport([], 0.5, False, model, declined=[DeclinedImage(sources[0], ("age",))])
    with pytest.raises(ValueError, match="at least one source image"):
        PneumoniaReport([], None, None, model)
    with pytest.raises(ValueError, match='"reasons"'):
        DeclinedImage(sources[0], ())
    with pytest.raises(ValueError, match="repeats a SOP Instance UID"):
        PneumoniaReport([sources[0]], 0.5, False, model, declined=[DeclinedImage(sources[0], ("age",))])


def _walk_codes(ds):
    for element in ds.iterall():
        if element.VR == "SQ":
            for item in element.value:
                if "CodeValue" in item and "CodingSchemeDesignator" in item:
                    yield item


# -- heatmap evidence: where on the image, the Segmentation and the key image -----------------------
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def heatmap_evidence(sources, probabilities, *, segmentation=True, key_image=True, point=False, shift=0.0, sides=5):
    """One HeatmapEvidence per source: a closed polygon of `sides` corners inside the image (or a
    point), objects in two new series of the study."""
    from worker.sr import HeatmapEvidence, ReferencedObject

    seg_series, key_series = generate_uid(), generate_uid()
    items = []
    for ds, probability in zip(sources, probabilities):
        columns, rows = int(ds.Columns), int(ds.Rows)
        if point:
            region = [(columns * 0.5 + shift, rows * 0.25)]
        else:
            angles = np.linspace(0, 2 * np.pi, sides, endpoint=False)
            region = [(columns * (0.45 + 0.3 * np.cos(a)) + shift, rows * (0.5 + 0.3 * np.sin(a))) for a in angles]
            region.append(region[0])
        items.append(HeatmapEvidence(
            ds, region, probability,
            segmentation=ReferencedObject(SEGMENTATION_STORAGE, generate_uid(), seg_series) if segmentation else None,
            key_image=ReferencedObject(SECONDARY_CAPTURE_STORAGE, generate_uid(), key_series, 512 + rows, 400 + columns)
            if key_image else None))
    return items


def _content_references(ds: pydicom.Dataset) -> set[str]:
    found = set()
    for item in ds.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            found.add(str(ref.ReferencedSOPInstanceUID))
        found |= _content_references(item)
    return found


def _expected_evidence(items) -> list[dict]:
    def obj(o, **extra):
        return None if o is None else {"sop_class_uid": o.sop_class_uid, "sop_instance_uid": o.sop_instance_uid,
                                       "series_instance_uid": o.series_instance_uid, **extra}
    return [{"source_sop_instance_uid": str(item.source.SOPInstanceUID),
             "graphic_type": "POINT" if item.is_point else "POLYLINE",
             "region": [tuple(p) for p in item.region],
             "probability": item.probability,
             "presence": None,  # filled by the caller
             "segmentation": obj(item.segmentation, frame_number=1, segment_number=1),
             "key_image": obj(item.key_image, rows=item.key_image.rows, columns=item.key_image.columns)
             if item.key_image else None} for item in items]


def _assert_evidence_read_back(back, items, model):
    expected = _expected_evidence(items)
    for want in expected:
        want["presence"] = "present" if want["probability"] >= model.calibrated_threshold else "absent"
    got = back["evidence"]
    assert len(got) == len(expected)
    for g, w in zip(got, expected):
        assert g["probability"] == pytest.approx(w["probability"], abs=1e-9)
        np.testing.assert_allclose(np.array(g["region"]), np.array(w["region"]), atol=1e-3)  # FL: float32
        assert {k: v for k, v in g.items() if k not in ("probability", "region")} == \
            {k: v for k, v in w.items() if k not in ("probability", "region")}


@pytest.mark.parametrize("count", [1, 2])
def test_evidence_sr_is_valid_and_reads_back(sources, model, count, fresh_templates, tmp_path):
    """dciodvfy 0 errors, every referenced instance in the evidence sequence, highdicom finds the
    region (POLYLINE, closed, on its source) and the Segmentation frame, DCMTK parses it, and the
    read-back equals what was given; the study-level finding is unchanged."""
    import highdicom as hd

    chosen = sources[:count]
    items = heatmap_evidence(chosen, [0.91, 0.17][:count])
    report = PneumoniaReport(chosen, 0.91, True, model, evidence=items, **sr_arguments(1))
    data = encode_pneumonia_sr(report)  # the first of its shape: built by highdicom
    path = tmp_path / "ev.dcm"
    path.write_bytes(data)
    errors, _ = dciodvfy(path)
    assert errors == []
    sr = pydicom.dcmread(path)
    evidence = {str(sop.ReferencedSOPInstanceUID): str(series.SeriesInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence for series in study.ReferencedSeriesSequence
                for sop in series.ReferencedSOPSequence}
    objects = {o.sop_instance_uid: o.series_instance_uid for item in items for o in item.objects}
    assert len(objects) == 2 * count
    referenced = _content_references(sr)
    assert set(objects) <= referenced and referenced <= set(evidence)  # every reference resolves
    assert {uid: evidence[uid] for uid in objects} == objects  # in their own series
    assert "PertinentOtherEvidenceSequence" not in sr

    document = hd.sr.srread(path)
    regions = document.content.get_planar_roi_measurement_groups(graphic_type=hd.sr.GraphicTypeValues.POLYLINE)
    assert len(regions) == count
    for group, item in zip(regions, items):
        assert group.reference_type == pydicom.sr.codedict.codes.DCM.ImageRegion
        points = group.roi.value
        assert points.shape == (6, 2) and list(points[0]) == list(points[-1])  # 5 corners, closed
        source = group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert source == item.source.SOPInstanceUID
        assert group.finding_type == PNEUMONIA
    for ds in chosen:  # the referenced source, as highdicom looks it up
        found = document.content.get_planar_roi_measurement_groups(referenced_sop_instance_uid=ds.SOPInstanceUID)
        assert len(found) == 2  # the region and the Segmentation frame of that image
    segments = [g for g in document.content.get_planar_roi_measurement_groups()
                if g.reference_type == pydicom.sr.codedict.codes.DCM.ReferencedSegmentationFrame]
    assert [str(g.referenced_segmentation_frame.referenced_sop_instance_uid) for g in segments] == \
        [item.segmentation.sop_instance_uid for item in items]

    back = read_pneumonia_sr(sr)
    assert (back["presence"], back["probability"]) == ("present", pytest.approx(0.91))
    assert back["referenced_sop_instance_uids"] == [str(ds.SOPInstanceUID) for ds in chosen]
    _assert_evidence_read_back(back, items, model)

    require_tool("dsrdump")
    run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr.strip() == "", run.stderr
    assert run.stdout.count('"Image Region")=(POLYLINE') == count
    assert run.stdout.count('"Referenced Segmentation Frame")') == count


EVIDENCE_VARIANTS = {
    "seg-and-key-image": dict(),
    "seg-only": dict(key_image=False),
    "key-image-only": dict(segmentation=False),
    "region-only-point": dict(segmentation=False, key_image=False, point=True),
}


@pytest.mark.parametrize("variant", list(EVIDENCE_VARIANTS))
def test_evidence_template_gives_the_reference_bytes(model, variant, fresh_templates, tmp_path):
    """Studies 2-4 of a shape with evidence are rendered from the template (regions, probabilities,
    objects, sizes all different) and equal build_pneumonia_sr + save_as; a retry gives the same bytes."""
    options = EVIDENCE_VARIANTS[variant]
    for seed in (1, 2, 3, 4):
        study = make_study(SHAPES["three-cr-dx-two-series"], seed)
        items = heatmap_evidence(study[:2], [0.95 - 0.01 * seed, 0.9 + 0.01 * seed], shift=0.5 * seed,
                                 sides=3 + seed, **options)  # the number of points is a value, not the shape
        arguments = sr_arguments(seed)
        report = PneumoniaReport(study, 0.95, True, model, evidence=items, **arguments)
        fast = encode_pneumonia_sr(report)
        reference = sr_file_bytes(build_pneumonia_sr(report))
        assert_same_sr(fast, reference)
        retry = PneumoniaReport(study, 0.95, True, model, evidence=items, **arguments)
        assert _bytes_with_fixed_times(encode_pneumonia_sr(retry)) == _bytes_with_fixed_times(fast)
        back = read_pneumonia_sr(pydicom.dcmread(io.BytesIO(fast)))
        _assert_evidence_read_back(back, items, model)
        if seed == 4:
            path = tmp_path / f"{variant}.dcm"
            path.write_bytes(fast)
            errors, _ = dciodvfy(path)
            assert errors == []
    info = template_cache_info()
    assert (info["template"], info["reference"], info["unfit"]) == (7, 1, 0), info  # the retries too


def test_evidence_shapes_never_share_a_template(model, fresh_templates):
    """An SR without evidence, with evidence, with an absent image, with a point: each its own template."""
    for seed in (1, 2):
        study = make_study(SHAPES["dx-two-monochrome1"], seed)
        for items in ((), heatmap_evidence(study, [0.9, 0.8]), heatmap_evidence(study, [0.9, 0.1]),
                      heatmap_evidence(study[:1], [0.9], point=True), heatmap_evidence(study[1:], [0.9])):
            report = PneumoniaReport(study, 0.9, True, model, evidence=items, **sr_arguments(seed))
            assert_same_sr(encode_pneumonia_sr(report), sr_file_bytes(build_pneumonia_sr(report)))
    assert template_cache_info()["template"] == 5


def test_evidence_checks_name_their_argument(sources, model):
    from worker.sr import HeatmapEvidence, ReferencedObject

    good = heatmap_evidence(sources, [0.9, 0.2])
    item = good[0]
    square = [(10.0, 10.0), (50.0, 10.0), (50.0, 60.0), (10.0, 10.0)]
    cases = [
        (dict(region=[(10, 10), (50, 10), (50, 60), (11, 10)]), '"region" must be a closed polygon'),
        (dict(region=[(10, 10), (50, 10), (10, 10)]), '"region" must be a closed polygon'),
        (dict(region=[(10, 10), (50, 10), (10, 10), (10, 10)]), "3 distinct"),
        (dict(region=[(10, 10), (item.source.Columns + 1, 10), (50, 60), (10, 10)]), "outside the image"),
        (dict(region=[(float("nan"), 1.0)]), "outside the image"),
        (dict(region=[(1, 2, 3)]), '"region" must be a sequence of'),
        (dict(probability=1.5), '"probability"'),
        (dict(key_image=ReferencedObject(SECONDARY_CAPTURE_STORAGE, generate_uid(), generate_uid())), '"key_image"'),
    ]
    for changes, message in cases:
        fields = dict(source=item.source, region=square, probability=0.5, segmentation=item.segmentation,
                      key_image=item.key_image)
        fields.update(changes)
        with pytest.raises(ValueError, match=message):
            HeatmapEvidence(**fields)
    with pytest.raises(TypeError, match='"segmentation"'):
        HeatmapEvidence(item.source, square, 0.5, segmentation=item.segmentation.sop_instance_uid)
    with pytest.raises(ValueError, match='"sop_instance_uid"'):
        ReferencedObject(SEGMENTATION_STORAGE, "1.2.x", generate_uid())
    with pytest.raises(ValueError, match='"rows"'):
        ReferencedObject(SECONDARY_CAPTURE_STORAGE, generate_uid(), generate_uid(), 0, 10)
    with pytest.raises(ValueError, match="not one of the report's assessed sources"):
        PneumoniaReport(sources[:1], 0.9, True, model, evidence=good[1:])
    with pytest.raises(ValueError, match="repeats an image"):
        PneumoniaReport(sources, 0.9, True, model, evidence=[good[0], good[0]])
    with pytest.raises(ValueError, match="for every item or for none"):
        PneumoniaReport(sources, 0.9, True, model,
                        evidence=[good[0], HeatmapEvidence(good[1].source, square, 0.2, good[1].segmentation)])
    clash = HeatmapEvidence(good[1].source, square, 0.2, ReferencedObject(SEGMENTATION_STORAGE, generate_uid(),
                                                                           str(sources[0].SeriesInstanceUID)),
                            good[1].key_image)
    with pytest.raises(ValueError, match="new series"):
        PneumoniaReport(sources, 0.9, True, model, evidence=[good[0], clash])
    same = HeatmapEvidence(good[1].source, square, 0.2, good[0].segmentation, good[1].key_image)
    with pytest.raises(ValueError, match="its own SOP Instance UID"):
        PneumoniaReport(sources, 0.9, True, model, evidence=[good[0], same])
    with pytest.raises(TypeError, match='"evidence"'):
        PneumoniaReport(sources, 0.9, True, model, evidence=[square])
    assert PneumoniaReport(sources, 0.9, True, model, evidence=good).evidence == tuple(good)


def test_mixed_study_with_evidence_is_valid_and_reads_back(sources, model, tmp_path):
    """A study with a declined image keeps its "not all algorithms succeeded" shape (built by highdicom)
    and carries the assessed image's evidence; the region may come as a numpy array."""
    from worker.sr import DeclinedImage, HeatmapEvidence

    item = heatmap_evidence(sources[:1], [0.88])[0]
    item = HeatmapEvidence(item.source, np.asarray(item.region), item.probability, item.segmentation, item.key_image)
    report = PneumoniaReport([sources[0]], 0.88, True, model, declined=[DeclinedImage(sources[1], ("view_position",))],
                             evidence=[item])
    path = tmp_path / "mixed.dcm"
    path.write_bytes(encode_pneumonia_sr(report))
    errors, _ = dciodvfy(path)
    assert errors == []
    back = read_pneumonia_sr(pydicom.dcmread(path))
    assert back["summary"] == "Not all algorithms succeeded; with findings"
    assert [d["sop_instance_uids"] for d in back["declined_images"]] == [[str(sources[1].SOPInstanceUID)]]
    _assert_evidence_read_back(back, [item], model)
    with pytest.raises(ValueError, match="assessed sources"):  # no evidence for a declined image
        PneumoniaReport([sources[0]], 0.88, True, model, declined=[DeclinedImage(sources[1], ("age",))],
                        evidence=heatmap_evidence(sources[1:], [0.5]))


def test_evidence_references_resolve_to_real_heatmap_objects(wrapped, model, tmp_path):
    """A real fractional Segmentation and an RGB Secondary Capture of a wrapped DX (highdicom, as
    worker/heatmap makes them), referenced through ReferencedObject.from_dataset: every instance the
    SR references is one of the files, with the SOP class and series the SR states."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from worker.sr import HeatmapEvidence, ReferencedObject

    source = pydicom.dcmread(wrapped[0])
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="heatmap", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(name=model.name, version=model.version,
                                                                    family=codes.DCM.ArtificialIntelligence))
    heat = np.zeros((source.Rows, source.Columns), np.float32)
    heat[60:120, 40:110] = 0.8
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=heat, segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9902, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="cxr-worker", manufacturer_model_name=model.name, software_versions="1",
        device_serial_number=model.uid)
    key = hd.sc.SCImage.from_ref_dataset(
        source, pixel_array=np.zeros((320, 250, 3), np.uint8), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "F"), series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(), series_number=9903,
        instance_number=1, manufacturer="cxr-worker")
    files = {}
    for name, ds in (("source", source), ("seg", seg), ("key", key)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path, stop_before_pixels=True)
        files[str(back.SOPInstanceUID)] = back
    header = files[str(source.SOPInstanceUID)]
    item = HeatmapEvidence(header, [(40, 60), (110, 60), (110, 120), (40, 120), (40, 60)], 0.93,
                           ReferencedObject.from_dataset(files[str(seg.SOPInstanceUID)]),
                           ReferencedObject.from_dataset(files[str(key.SOPInstanceUID)]))
    assert (item.key_image.rows, item.key_image.columns) == (320, 250)
    data = encode_pneumonia_sr(PneumoniaReport([header], 0.93, True, model, evidence=[item], **sr_arguments(1)))
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    errors, _ = dciodvfy(path)
    assert errors == []
    sr = pydicom.dcmread(path)
    stated = {str(sop.ReferencedSOPInstanceUID): (str(sop.ReferencedSOPClassUID), str(series.SeriesInstanceUID),
                                                  str(study.StudyInstanceUID))
              for study in sr.CurrentRequestedProcedureEvidenceSequence for series in study.ReferencedSeriesSequence
              for sop in series.ReferencedSOPSequence}
    assert _content_references(sr) == set(stated) == set(files)
    for uid, (sop_class, series, study) in stated.items():
        assert (sop_class, series, study) == (str(files[uid].SOPClassUID), str(files[uid].SeriesInstanceUID),
                                              str(files[uid].StudyInstanceUID))
    assert int(files[str(seg.SOPInstanceUID)].NumberOfFrames) == 1  # the frame the SR references exists
    back = read_pneumonia_sr(sr)["evidence"][0]
    assert back["segmentation"]["sop_instance_uid"] == str(seg.SOPInstanceUID)
    assert back["key_image"]["sop_instance_uid"] == str(key.SOPInstanceUID)


def test_the_evidence_sr_reads_nothing_outside_source_tags(model, fresh_templates):
    """The heatmap groups and their template read only kept attributes of the sources too."""
    asked: set = set()
    for seed in (1, 2):  # the reference builds the template, the template renders
        recording = [RecordingDataset(ds, asked) for ds in make_study(SHAPES["three-cr-dx-two-series"], seed)]
        asked.clear()
        report = PneumoniaReport(recording, 0.9, True, model, evidence=heatmap_evidence(recording, [0.9, 0.3, 0.5]),
                                 **sr_arguments(seed))
        encode_pneumonia_sr(report)
        build_pneumonia_sr(report, reference=True)
        assert asked, "nothing recorded"
        outside = sorted(pydicom.datadict.keyword_for_tag(tag) or str(tag) for tag in asked - set(SOURCE_TAGS))
        assert outside == []
    assert template_cache_info()["template"] == 1
