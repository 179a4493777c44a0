"""highdicom's per-source steps of an SR, done without building one (used by worker/sr_template.py).

worker/sr_template.py must know, for each study, exactly what highdicom's Comprehensive3DSR would
take from the first source image: the Patient/General Study elements it copies, and the acquisition
Contributing Equipment item it adds. Building the SR to find out is what the template avoids, so
these run the same highdicom code paths on their own. Kept apart from the template logic because
they mirror highdicom (and must follow it on upgrades), not our own rules.
"""

from __future__ import annotations

import datetime

import highdicom as hd
import pydicom
from pydicom.dataelem import DataElement
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag

_ACQUISITION_EQUIPMENT = codes.DCM.AcquisitionEquipment
#: (SOP class, tags present) combinations remembered by patient_study_elements.
_COPIED_TAGS_CACHE_SIZE = 64


class _PatientStudyCopy(hd.SOPClass):
    """Just highdicom's copy of the first image's Patient and Study modules (what Comprehensive3DSR
    does via SOPClass.copy_patient_and_study_information), without building a document."""

    def __init__(self, source: pydicom.Dataset) -> None:  # noqa: D107 - deliberately skips SOPClass.__init__
        pydicom.Dataset.__init__(self)
        self.copy_patient_and_study_information(source)


_copied_tags: dict[tuple, tuple[BaseTag, ...]] = {}


def patient_study_elements(source: pydicom.Dataset) -> dict[BaseTag, DataElement]:
    """The elements _PatientStudyCopy takes from `source`. Which tags it takes depends only on the
    SOP class (its IOD's modules) and the tags present, so that list is remembered (0.2 ms a copy)."""
    key = (str(source.SOPClassUID), frozenset(source.keys()))
    tags = _copied_tags.get(key)
    if tags is None:
        tags = tuple(_PatientStudyCopy(source).keys())
        if len(_copied_tags) >= _COPIED_TAGS_CACHE_SIZE:
            _copied_tags.clear()
        _copied_tags[key] = tags
    return {tag: source[tag] for tag in tags}


def acquisition_equipment(source: pydicom.Dataset) -> pydicom.Dataset | None:
    """highdicom's ContributingEquipment.for_image_acquisition(source), or None where that raises
    (Comprehensive3DSR then leaves the item out). Same constructor call; only its check that the
    SOP class is an image (about 1 ms a call) is left out: a template exists only for SOP classes
    the reference accepted, and its image library refuses non-image SOP classes."""
    manufacturer = source.get("Manufacturer")
    if manufacturer is None or manufacturer == "":
        return None
    when = source.get("AcquisitionDateTime")
    if when is None:
        date, time = source.get("AcquisitionDate"), source.get("AcquisitionTime")
        if isinstance(date, datetime.date) and isinstance(time, datetime.time):
            when = datetime.datetime.combine(date, time)
    try:
        return hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=_ACQUISITION_EQUIPMENT,
            manufacturer_model_name=source.get("ManufacturerModelName"),
            software_versions=source.get("SoftwareVersions"),
            device_serial_number=source.get("DeviceSerialNumber"),
            institution_name=source.get("InstitutionName"),
            institutional_department_name=source.get("InstitutionalDepartmentName"),
            institution_address=source.get("InstitutionAddress"),
            station_name=source.get("StationName"),
            contribution_datetime=when,
            contribution_description="Acquisition equipment of the source image(s)",  # highdicom's words
        )
    except Exception:  # noqa: BLE001 - exactly what highdicom swallows here
        return None
