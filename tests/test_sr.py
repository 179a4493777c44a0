"""The pneumonia SR: highdicom reads back what we wrote, dicom3tools and DCMTK find it valid."""

from __future__ import annotations

import copy
import io
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import require_tool

from trainer.checkpoint import ModelInfo, new_model_uid
from worker.wrap import DX_FOR_PRESENTATION, wrap_image_as_dicom
from worker.sr import (
    CERTAINTY_OF_FINDING,
    PNEUMONIA,
    PROCESSING_EQUIPMENT,
    SR_SERIES_DESCRIPTION,
    build_pneumonia_sr,
    read_pneumonia_sr,
)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def model() -> ModelInfo:
    return ModelInfo(arch="simplecnn", name="cxr-pneumonia-test", version="1.2.3", threshold=0.42, uid=new_model_uid())


@pytest.fixture(scope="module")
def wrapped(kaggle_jpegs: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real Kaggle films of one patient, wrapped as DX images of one study, written to disk."""
    out = tmp_path_factory.mktemp("wrapped")
    study_uid = pydicom.uid.generate_uid()
    paths = []
    for index, jpeg in enumerate(kaggle_jpegs["PNEUMONIA"][:2]):
        ds = wrap_image_as_dicom(jpeg, patient_id="person-test", study_uid=study_uid)
        path = out / f"dx{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def sources(wrapped: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in wrapped]


@pytest.fixture(scope="module")
def sr_file(sources: list[pydicom.Dataset], model: ModelInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sr = build_pneumonia_sr(sources, 0.8731, True, model)
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
    sr = build_pneumonia_sr(sources, probability, positive, model)
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
    first = build_pneumonia_sr(sources, 0.5, True, model, series_number=9902, instance_number=3, **kwargs)
    second = build_pneumonia_sr(sources, 0.5, True, model, series_number=9902, instance_number=3, **kwargs)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID == kwargs["sr_series_uid"]
    assert first.SOPInstanceUID == second.SOPInstanceUID == kwargs["sr_instance_uid"]
    assert (first.SeriesNumber, first.InstanceNumber) == (9902, 3)
    assert str(first.ContentSequence) == str(second.ContentSequence)  # same tracking UID, same tree


def test_sources_without_geometry_or_type2_attributes(sources, model):
    bare = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "Modality", "PatientID"):
        setattr(bare, keyword, sources[0].get(keyword))
    result = read_pneumonia_sr(build_pneumonia_sr([bare], 0.3, False, model))
    assert result["referenced_sop_instance_uids"] == [sources[0].SOPInstanceUID]


def _bytes_with_fixed_times(sr: pydicom.Dataset) -> bytes:
    """The SR's file bytes with the creation dates/times (the only values taken from the clock) fixed."""
    for keyword in ("ContentDate", "InstanceCreationDate", "SeriesDate"):
        if keyword in sr:
            setattr(sr, keyword, "20000101")
    for keyword in ("ContentTime", "InstanceCreationTime", "SeriesTime"):
        if keyword in sr:
            setattr(sr, keyword, "000000")
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = "20000101000000"
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


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
    fast = build_pneumonia_sr(chosen, 0.8731, True, model, **kwargs)
    full = build_pneumonia_sr(chosen, 0.8731, True, model, reference=True, **kwargs)
    assert str(fast.content) == str(full.content)  # .content (highdicom's parsed tree) too
    assert _bytes_with_fixed_times(fast) == _bytes_with_fixed_times(full)


def test_invalid_inputs_are_rejected(sources, model):
    with pytest.raises(ValueError, match="at least one"):
        build_pneumonia_sr([], 0.5, True, model)
    for probability in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            build_pneumonia_sr(sources, probability, True, model)
    other = copy.deepcopy(sources[1])
    other.StudyInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(ValueError, match="one study"):
        build_pneumonia_sr([sources[0], other], 0.5, True, model)
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        build_pneumonia_sr(sources, 0.5, True, model, sr_instance_uid="not-a-uid")
    no_uid = copy.deepcopy(sources[0])
    del no_uid.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build_pneumonia_sr([no_uid], 0.5, True, model)


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
