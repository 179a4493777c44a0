"""Every place the SR code leans on highdicom beyond its public API, and the version that was checked.

Checked against highdicom 0.28 (0.28.2). Each touch, and why:

``patient_study_elements`` (class ``_PatientStudyCopy``)
    The template (worker/sr/template.py) must know which elements Comprehensive3DSR copies from the
    first source (SOPClass.copy_patient_and_study_information: the root attributes of the Patient
    and Study IE modules of the source's IOD, from highdicom's tables). Building an SR to find out
    is what the template avoids, so a ``hd.SOPClass`` is made *without* running its ``__init__``
    (which needs a whole document's arguments) and only that public method is called on it. Relies
    on the method needing nothing ``__init__`` sets.
``acquisition_equipment``
    ``ContributingEquipment.for_image_acquisition`` as Comprehensive3DSR calls it (the first
    source's acquisition item, left out where it raises), rewritten with the same constructor call
    but without its check that the SOP class is an image (about 1 ms a call, from highdicom's
    tables): a template exists only for SOP classes the reference accepted. Relies on that
    method's body (which attributes it reads, its description text).
``content_stub`` / ``attach_content``
    Comprehensive3DSR deep-copies and re-parses the whole content tree it is given and walks it
    twice for references: half of an SR's cost. build_pneumonia_sr hands it only the root's own
    attributes and attaches the tree afterwards the way the constructor does: the root's elements
    copied into the document, and the parsed tree set as the private ``_content`` that
    ``.content`` returns. tests/worker/sr/test_sr.py checks both give the same bytes and content.

The version gate below runs when this module is imported, i.e. on the first import of worker.sr
(its __init__ imports the builder, which imports this module). So a highdicom outside the checked
minor version reaches none of the above, whichever way in (service, CLI, tests, benchmarks); the
service imports worker.sr with its receiver, so it fails at start-up, before it opens its port,
with an error that names both versions.
"""

from __future__ import annotations

import datetime

import highdicom as hd
import pydicom
from highdicom.sr import ContentSequence
from pydicom.dataelem import DataElement
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag

from ..errors import UnsupportedDependency

#: The highdicom minor version these touches (and the SR templates) were checked against.
TESTED_MINOR = (0, 28)


def check_version(version: str) -> None:
    """Raise UnsupportedDependency unless `version` (a highdicom version) is of TESTED_MINOR."""
    parts = version.split(".")
    try:
        minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        minor = None
    if minor != TESTED_MINOR:
        tested = ".".join(map(str, TESTED_MINOR))
        raise UnsupportedDependency(
            f"highdicom {version} is installed, but the SR code was checked against highdicom {tested}.x "
            f"(worker/sr/_highdicom.py); install highdicom=={tested}.*"
        )


check_version(hd.__version__)

# --- The Patient/Study copy -------------------------------------------------------------------------
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


# --- The acquisition equipment item -----------------------------------------------------------------
_ACQUISITION_EQUIPMENT = codes.DCM.AcquisitionEquipment


def acquisition_equipment(source: pydicom.Dataset) -> pydicom.Dataset | None:
    """highdicom's ContributingEquipment.for_image_acquisition(source), or None where that raises
    (Comprehensive3DSR then leaves the item out); see the module docstring."""
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


# --- The content tree, attached after the constructor -----------------------------------------------
def content_stub(root: pydicom.Dataset) -> pydicom.Dataset:
    """The root container's own attributes without its children, for Comprehensive3DSR(content=...)."""
    stub = pydicom.Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            stub.add(element)
    stub.ContentSequence = []
    return stub


def attach_content(sr: hd.sr.Comprehensive3DSR, root: pydicom.Dataset) -> None:
    """Put the whole tree `root` into `sr`, built from content_stub(root), as the constructor would."""
    for tag, element in root.items():  # what the constructor does with the content it is given
        sr[tag] = element
    sr._content = ContentSequence([root], is_root=True)  # what .content returns
